"""Freed host memory is kept and reused: a large block allocated again costs no page faults."""

import subprocess
import sys

import pytest

# Allocate, fill and free a 64 MiB block (over glibc's largest mmap threshold) five times, after a first
# round; print the minor page faults of the five. Run in a child: the setting is process-wide.
CHILD = r"""
import ctypes, ctypes.util, resource, sys
from experiments.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20

def round_trip():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)

round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and its page faults: Linux")
def test_a_freed_block_is_reused_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    pages = 5 * (64 << 20) // 4096
    if faults["default"] < pages // 2:
        pytest.skip(f"this C library does not unmap freed large blocks ({faults['default']} faults)")
    assert faults["keep"] < pages // 50, faults  # every page of every block faulted in again without it
