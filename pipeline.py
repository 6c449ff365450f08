"""Deprecated alias of `vlmheads.parallel`, kept for one release: `torchrun ... -m vlmheads.pipeline` still runs.

"pipeline" also names Hugging Face inference pipelines; pipeline parallelism now lives in `vlmheads.parallel`.
"""

import warnings

from .parallel import *  # noqa: F403
from .parallel import __all__  # noqa: F401

if __name__ == "__main__":
    from .parallel.__main__ import main

    warnings.warn(
        "`-m vlmheads.pipeline` is now `-m vlmheads.parallel` (or `vlmheads parallel`).", FutureWarning, stacklevel=1
    )
    main()
