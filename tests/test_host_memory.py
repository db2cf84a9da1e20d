"""`ctxjax.host_memory.release_free_memory`: freed heap pages go back to the OS (glibc)."""

import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter: the heap's state in a long test process (other tests' threads, arenas and
# thresholds) is not this pattern's.
_PATTERN = textwrap.dedent(
    """
    import ctypes
    from ctxjax.host_memory import release_free_memory

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(16 << 20))  # raises glibc's mmap threshold above 200 KiB
    blocks, small = [], []
    for _ in range(1000):
        blocks.append(libc.malloc(200 << 10))
        ctypes.memset(blocks[-1], 1, 200 << 10)  # resident
        small.append(libc.malloc(64))  # live between the blocks: the heap cannot shrink
    for b in blocks:
        libc.free(b)
    before = rss()
    asked = release_free_memory()
    print(asked, before - rss())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_is_returned():
    """The pattern that keeps a CPU run's resident set high: once a free of a 16 MiB buffer has
    raised glibc's mmap threshold, 200 KiB buffers come from the heap; freed between small live
    allocations they stay resident (200 MB here) until `release_free_memory` returns them."""
    out = subprocess.run(
        [sys.executable, "-c", _PATTERN], check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) > 150 << 20, out
