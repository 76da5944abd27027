"""Keep the C allocator from handing per-pair arrays back to the kernel.

Every pair allocates a dozen arrays of a few hundred kilobytes (windows, difference,
compacted pixels, residuals). glibc serves blocks of that size with ``mmap`` and
returns them with ``munmap`` on free, or trims them off the top of the heap, so each
new array is faulted in again page by page: on the 400-tile benchmark survey that was
over 500,000 page faults and a quarter of the run time on two threads. Raising the
mmap and trim thresholds makes freed blocks stay in the heap for the next pair.

Memory stays bounded: blocks above :data:`MMAP_THRESHOLD` (a huge overlap) are still
mapped and unmapped, and at most :data:`TRIM_THRESHOLD` of free memory is kept at the
top of a heap. On other C libraries this does nothing.
"""
from __future__ import annotations

import ctypes
import sys

#: Blocks at least this large are still given their own mapping (glibc's maximum).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory kept at the top of a heap before it is returned to the kernel.
TRIM_THRESHOLD = 64 * 1024 * 1024

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process).

    Returns
    -------
    bool
        True when the allocator accepted the settings (glibc), False elsewhere.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        # The process's own symbols (dlopen(NULL)) include the C library's: no
        # ctypes.util.find_library, which imports subprocess and runs ldconfig.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
