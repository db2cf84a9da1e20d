"""`ctxjax.host_memory`: freed heap pages go back to the OS (`release_free_memory`, glibc), and the
entry points' caching allocator (`exec_with_caching_allocator`, mimalloc)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from ctxjax.host_memory import allocator_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# An entry point's start: re-executes itself with the caching allocator where that applies, then
# prints the allocator, the page faults of each of a jitted call's runs (its temporaries, two
# [8192, 8192] f32 matmul operands, 512 MiB, are allocated and freed by XLA every call) and the
# output.
_ENTRY = textwrap.dedent(
    """
    import os, resource, sys
    from ctxjax.host_memory import (
        exec_with_caching_allocator,
        process_allocator,
        release_free_memory,
    )

    if __name__ == "__main__":
        exec_with_caching_allocator()
        import jax, jax.numpy as jnp

        @jax.jit
        def f(x_N):
            y_NxN = jnp.outer(jnp.sin(x_N), jnp.cos(x_N))
            return y_NxN @ x_N + y_NxN.T @ x_N

        x_N = jnp.linspace(0.0, 1.0, 8192, dtype=jnp.float32)
        faults = []
        for _ in range(10):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out = jax.block_until_ready(f(x_N))
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(
            process_allocator(),
            os.environ.get("CTXJAX_ALLOCATOR"),
            release_free_memory(),
            ",".join(map(str, faults)),
            out.tobytes().hex(),
        )
    """
)


def _entry_env(**extra) -> dict[str, str]:
    """This environment for an entry point on the CPU, the allocator left to its own choice."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CTXJAX_ALLOCATOR")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _run_entry(tmp_path, **env_extra) -> tuple[str, str, list[int], str]:
    script = tmp_path / "entry.py"
    script.write_text(_ENTRY)
    env = _entry_env(**env_extra)
    allocator, marker, trimmed, faults, out = subprocess.run(
        [sys.executable, str(script)], check=True, capture_output=True, text=True, env=env
    ).stdout.split()
    # glibc's heap is trimmed where it serves malloc, and only there.
    assert trimmed == str(allocator == "system"), (allocator, trimmed)
    return allocator, marker, [int(n) for n in faults.split(",")], out


@pytest.mark.skipif(
    allocator_library() is None, reason="cmeel-mimalloc not installed (Linux x86-64)"
)
def test_entry_point_reuses_step_temporaries_under_the_caching_allocator(tmp_path):
    """Against the same entry point kept on glibc (CTXJAX_ALLOCATOR=system): glibc maps the
    512 MiB of temporaries afresh on every call (~131k page faults each); the re-executed process
    runs mimalloc, which reuses the freed memory, so that over the nine calls after the first it
    faults in at most one more set of temporaries; the output is bit for bit the same.

    Why one more set may come: XLA frees a call's temporaries after its output is ready, and a
    next call that starts before that free lands gets fresh memory (most runs on a 2-core CPU;
    never a third set). Asserting no fault on the third call failed that way."""
    set_pages = 2 * (8192 * 8192 * 4) // 4096
    allocator, marker, faults, out = _run_entry(tmp_path)
    assert (allocator, marker) == ("mimalloc", "mimalloc")
    assert sum(faults[1:]) < 1.25 * set_pages, faults
    allocator, marker, faults_glibc, out_glibc = _run_entry(tmp_path, CTXJAX_ALLOCATOR="system")
    assert (allocator, marker) == ("system", "system")
    # The reference, so that the test can fail: every call faults its temporaries in.
    assert min(faults_glibc[1:]) > set_pages // 2, faults_glibc
    assert out == out_glibc


def test_caching_allocator_left_to_users_and_accelerators(monkeypatch):
    """When the entry point re-executes, with what; and where it must not: the environment already
    chose (LD_PRELOAD, CTXJAX_ALLOCATOR: also the re-executed process itself), JAX may pick an
    accelerator, or mimalloc is not installed."""
    from ctxjax import host_memory

    lib = "/opt/lib/libmimalloc.so"
    argv = ["python3", "-X", "dev", "scripts/train.py", "loss.beta=0.0"]
    target = host_memory.caching_allocator_exec({"JAX_PLATFORMS": "cpu"}, argv, lib)
    options = host_memory.mimalloc_options()
    assert target == (
        sys.executable,
        argv,
        {"JAX_PLATFORMS": "cpu", **options, "LD_PRELOAD": lib, "CTXJAX_ALLOCATOR": "mimalloc"},
    )
    # A user's own mimalloc setting stays.
    env = {"JAX_PLATFORMS": "cpu", "MIMALLOC_PURGE_DELAY": "10"}
    assert host_memory.caching_allocator_exec(env, argv, lib)[2]["MIMALLOC_PURGE_DELAY"] == "10"
    assert host_memory.mimalloc_options(24 << 30)["MIMALLOC_ARENA_MAX_OBJECT_SIZE"] == "24GiB"
    for env in (
        {"JAX_PLATFORMS": "cpu", "LD_PRELOAD": "/x/libtcmalloc.so"},
        {"JAX_PLATFORMS": "cpu", "CTXJAX_ALLOCATOR": "system"},
        {"JAX_PLATFORMS": "cpu", "CTXJAX_ALLOCATOR": "mimalloc"},
        {"JAX_PLATFORMS": "cuda,cpu"},
        {"JAX_PLATFORMS": "tpu"},
    ):
        assert host_memory.caching_allocator_exec(env, argv, lib) is None, env
    monkeypatch.setattr(host_memory, "allocator_library", lambda: None)
    assert host_memory.caching_allocator_exec({"JAX_PLATFORMS": "cpu"}, argv) is None


@pytest.mark.skipif(
    allocator_library() is None, reason="cmeel-mimalloc not installed (Linux x86-64)"
)
@pytest.mark.parametrize(
    "script",
    sorted(
        path.name
        for path in pathlib.Path(ROOT, "scripts").glob("*.py")
        if "exec_with_caching_allocator()" in path.read_text()
    ),
)
def test_entry_point_re_executes_before_its_heavy_imports(script):
    """Each entry point in scripts/ replaces itself before it imports jax: Python's import log
    (`-X importtime`, kept across the exec with the interpreter's flags) shows ctxjax.host_memory
    imported by both processes, jax by the second only: importing first cost every command the
    heavy imports twice."""
    log = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join("scripts", script), "--help"],
        capture_output=True,
        text=True,
        env=_entry_env(),
        cwd=ROOT,
    ).stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in log.splitlines() if "|" in line]
    assert imported.count("ctxjax.host_memory") == 2, "no re-execution"
    assert imported.count("jax") == 1, f"{script} imports jax before it re-executes"
