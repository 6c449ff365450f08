"""`python -m vlmheads`: the same as the `vlmheads` command."""

from .cli import main

main()
