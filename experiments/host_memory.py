"""Keep freed host memory in the process, so large tensor buffers are reused without page faults.

glibc's ``malloc`` serves every block above its mmap threshold (32 MiB at
most) with freshly mapped pages and unmaps them when the block is freed.  A
language model's logits (batch x context x vocabulary floats: 82 MB for
Brown's 10,000 words at 32 x 64) and their gradients are such blocks,
allocated and freed several times per step; every 4 KiB page of each is
faulted in again by the kernel.  A Brown run spent over a third of its CPU
time there (43 million minor page faults in 150 steps).  PyTorch keeps no
cache of host memory, so the fix belongs to the process:
:func:`keep_freed_memory` turns mmap off for ``malloc`` and raises the
threshold above which freed memory is returned to the system, so freed
blocks go back to the heap and the next step reuses them.  The price: the
process keeps its peak heap until it exits.

The ``eos`` command line calls it once at start (every run, sweep worker and
comparison worker); a notebook or script can call it too.  It changes
nothing where the C library is not glibc.

Example::

    >>> keep_freed_memory() in (True, False)   # False where the C library is not glibc
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap before returning it


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed memory (module docstring); True when it took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
