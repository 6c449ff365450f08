"""Memory that a served request frees goes back to the operating system.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after a few large images the
16 MiB blocks Pillow decodes into, and the processor's arrays, come from the heap, which keeps them after they are
freed: six requests of four 4096x4096 RGBA PNGs left a server at 3.4x its memory. A fixed threshold keeps every
block of MMAP_THRESHOLD_BYTES or more in its own mapping, returned when it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

#: Blocks of this size or more are mapped on their own (glibc's default starts at 128 KiB and floats up to 32 MiB).
MMAP_THRESHOLD_BYTES = 4 * 2**20
#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


def return_large_blocks_to_the_os(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold at `threshold` bytes; returns False where the C library is not glibc (nothing
    is changed there)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("The C library (%s) has no mallopt: freed memory is returned as it decides.", name)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
