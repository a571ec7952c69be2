"""Host allocator settings for a serving process (glibc malloc; elsewhere nothing is changed).

Every eager op and every compiled graph allocates its outputs anew, step after step. By default
glibc serves a block of more than a few MiB with a fresh mmap and unmaps it when freed (or trims
the heap top back to the system), so the next step's block of the same size faults in every page
again: a batch-16 decode step of the mid-size model gathered its KV blocks at ~2 GB/s, a third of
a plain copy. Served from the heap and kept there, the same memory is reused without faults.
The process keeps its peak footprint instead of giving it back, which is what a server wants.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it on 64-bit: larger blocks are always mmapped
TRIM_THRESHOLD = 2**31 - 1  # never hand freed heap back (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Serve blocks up to MMAP_THRESHOLD from the heap and never trim it; True where applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                   and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):
        applied = False
    if not applied:
        log.warning("could not set glibc malloc thresholds: large temporaries will be mapped afresh each step")
    return applied


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system now (glibc ``malloc_trim``): after a load, what
    loading dropped (granite_llm reads the vision tower and lets it go; packing linears replaces
    each weight) is otherwise kept, and the KV pool, sized from the memory available, comes out
    smaller. True where applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True
