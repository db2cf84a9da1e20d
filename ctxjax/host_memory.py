"""The process heap on a CPU backend: giving freed memory back, and a caching allocator.

On a CPU backend the device memory is the process's heap. Compiling a program, an evaluation (KV
caches, per-batch buffers) and a checkpoint save each allocate and free many buffers of a few MB;
glibc keeps what is freed in its arenas (its dynamic mmap threshold rises to 32 MB after the first
large free, so such buffers stop being mapped and unmapped), and the resident set never shrinks.
The next phase then allocates anew beside that retained memory, which on a real model's CPU run
was the largest part of the peak (docs/memory.md).

`release_free_memory()` asks glibc (`malloc_trim(0)`) to return free heap pages; a no-op where
there is no glibc heap (no glibc, or the caching allocator below). It frees nothing that is in
use, so results never depend on it.

`exec_with_caching_allocator()` is for the steady state of a training loop. XLA:CPU allocates each
execution's temporaries with malloc and frees them when it ends; glibc maps blocks that large
afresh and unmaps them on free, so every step faults its temporaries in again page by page, a
large share of the step's time. glibc's own options do not cure it (one arena without mmap
fragments the heap once the next step is dispatched before the last one's temporaries are freed;
transparent huge pages cut the faults but still zero the memory). mimalloc keeps freed memory in
its segments for the next allocation; it has to replace malloc before the process starts, so the
entry points re-execute themselves with it preloaded (`LD_PRELOAD`, settings in
`mimalloc_options`). The price is resident memory: the freed blocks stay, and a step whose
temporaries the last step's are not yet reusable for (freed by another of XLA's threads) takes a
fresh set, so a run can hold about twice glibc's peak (docs/memory.md). `CTXJAX_ALLOCATOR=system`
keeps glibc. Computed values do not depend on the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Returns glibc's free heap pages to the OS; True if glibc could be asked. False under the
    caching allocator: malloc is mimalloc's there, whose freed memory is kept on purpose and
    glibc's heap holds nothing to trim."""
    trim = _malloc_trim()
    if trim is None or process_allocator() == "mimalloc":
        return False
    trim(0)
    return True


# The allocator the entry points preload (PyPI `cmeel-mimalloc`: mimalloc's shared library).
ALLOCATOR_DIST = "cmeel-mimalloc"
# Set in the re-executed process: "mimalloc" (preloaded). Set it to "system" to keep glibc's.
ALLOCATOR_ENV = "CTXJAX_ALLOCATOR"


def allocator_library() -> str | None:
    """The path of the installed mimalloc shared library, or None."""
    try:
        files = importlib.metadata.files(ALLOCATOR_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    libs = sorted(str(f.locate()) for f in files if f.name.startswith("libmimalloc.so"))
    return next((p for p in libs if os.path.exists(p)), None)


def accelerator_possible(env=os.environ) -> bool:
    """Whether JAX may pick an accelerator in a process started with `env`, told without importing
    JAX: JAX_PLATFORMS names one first, or (none named) a PJRT plugin (CUDA, ROCm) or libtpu is
    installed."""
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    return bool(
        importlib.metadata.entry_points(group="jax_plugins")
        or importlib.util.find_spec("jax_plugins")
        or importlib.util.find_spec("libtpu")
    )


def caching_allocator_exec(env=os.environ, argv: list[str] | None = None, library=None):
    """`(executable, argv, env)` that runs this process again with mimalloc preloaded, or None
    where it should run as it is: not Linux, an accelerator possible (the temporaries live on the
    device there), mimalloc not installed, or the environment already choosing (`LD_PRELOAD` set,
    or `CTXJAX_ALLOCATOR` set: the re-executed process itself, or a user's "system")."""
    if not sys.platform.startswith("linux") or "LD_PRELOAD" in env or ALLOCATOR_ENV in env:
        return None
    library = library or allocator_library()
    if library is None or accelerator_possible(env):
        return None
    argv = list(sys.orig_argv if argv is None else argv)  # the interpreter's own flags too
    options = {k: v for k, v in mimalloc_options().items() if k not in env}  # the user's win
    return (
        sys.executable,
        argv,
        {**env, **options, "LD_PRELOAD": library, ALLOCATOR_ENV: "mimalloc"},
    )


def mimalloc_options(memory_bytes: int | None = None) -> dict[str, str]:
    """mimalloc's settings for a training loop (environment variables): keep freed memory
    (`PURGE_DELAY=-1`: a step's temporaries are freed at its end and allocated again at the next
    one's start), serve blocks of any size up to the machine's memory from its arenas (by default
    the largest, a big model's step temporaries, went to the OS and back every step), and no
    transparent huge pages (their zeroing on a fresh fault cost more system time than 4 KiB pages
    in the first steps). What this bought, measured: docs/memory.md."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gib = max(1, memory_bytes >> 30)
    return {
        "MIMALLOC_PURGE_DELAY": "-1",
        "MIMALLOC_ARENA_RESERVE": f"{gib}GiB",
        "MIMALLOC_ARENA_MAX_OBJECT_SIZE": f"{gib}GiB",
        "MIMALLOC_ALLOW_THP": "0",
    }


def exec_with_caching_allocator() -> None:
    """Re-executes this process with mimalloc preloaded (module docstring) when
    `caching_allocator_exec` says so; otherwise returns. Call it first in an entry point's
    `__main__` block, before anything else runs: the process is replaced."""
    target = caching_allocator_exec()
    if target is not None:
        executable, argv, env = target
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(executable, argv, env)


@functools.cache  # what is preloaded does not change while the process runs
def process_allocator() -> str:
    """The allocator this process runs: "mimalloc" where its library is mapped (preloaded), else
    "system" (glibc's malloc on Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            return "mimalloc" if any("libmimalloc" in line for line in maps) else "system"
    except OSError:
        return "system"
