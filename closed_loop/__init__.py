"""Closed-loop evaluation in simulators from PyPI (`pip install "vlmheads[sim]"`): driving in highway-env
(`vlmheads.closed_loop.driving`) and manipulation in Meta-World. Nothing heavy is imported here."""
