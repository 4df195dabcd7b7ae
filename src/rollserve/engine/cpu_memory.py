"""Keep freed memory in the process on CPU.

Every engine step allocates activation-sized tensors (tens of MB). By default glibc serves
those with fresh mmaps and returns them on free, so each step page-faults them in again
(measured: ~20% of a CPU benchmark's time went to the kernel). Serving large blocks from the
heap and never trimming it makes later steps reuse the same pages. The price: the process
keeps its peak memory, which is what a long-running server does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_MAX_INT = 2**31 - 1


def keep_freed_memory() -> bool:
    """Apply the glibc settings; returns False where there is no glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _MAX_INT) == 1
    if not ok:
        logger.debug("mallopt refused the settings; allocations stay as they are")
    return ok
