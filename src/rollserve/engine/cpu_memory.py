"""Keep freed memory in the process on CPU.

Every engine step allocates activation-sized tensors (tens of MB). By default glibc serves
those with fresh mmaps and returns them on free, so each step page-faults them in again
(measured: ~20% of a CPU benchmark's time went to the kernel). Serving large blocks from the
heap and never trimming it makes later steps reuse the same pages. The price: the process
keeps its peak memory, which is what a long-running server does anyway.

One arena for every thread: a thread other than the main one allocates from an arena of
64 MiB heaps, and a block larger than that (a 4096-token chunk's fused gate_up output is
80 MB for a 0.5B model) was mmapped and unmapped on every step despite the settings above
(measured: prefill 12-19% slower, the unmap inside the tensor's free). The main arena grows
without that limit. Set before the engine thread first allocates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
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
    ok = (mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _MAX_INT) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)
    if not ok:
        logger.debug("mallopt refused the settings; allocations stay as they are")
    return ok
