"""`ctxjax.host_memory.release_free_memory`: freed heap pages go back to the OS (glibc)."""

import ctypes
import sys

import pytest

from ctxjax.host_memory import release_free_memory


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_is_returned():
    """The pattern that keeps a CPU run's resident set high: once a free of a 16 MiB buffer has
    raised glibc's mmap threshold, 200 KiB buffers come from the heap; freed between small live
    allocations they stay resident (200 MB here) until `release_free_memory` returns them."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(16 << 20))
    blocks, small = [], []
    for _ in range(1000):
        blocks.append(libc.malloc(200 << 10))
        ctypes.memset(blocks[-1], 1, 200 << 10)  # resident
        small.append(libc.malloc(64))  # live between the blocks: the heap cannot shrink
    for b in blocks:
        libc.free(b)
    before = _rss_bytes()
    assert release_free_memory()
    assert before - _rss_bytes() > 150 << 20
    for s in small:
        libc.free(s)
