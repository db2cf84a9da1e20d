"""The machine and library versions a result was measured on, for the pages that report it."""

from __future__ import annotations

import os
import platform
from importlib import metadata

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers")


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or the platform's."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The widest x86 vector extension a CPU reports, widest first: the matmul kernels a library picks
# depend on it (torch's CPU GEMM on an AVX-512 AMD EPYC ran at half XLA's rate), so a result that
# compares libraries records it.
VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2")


def cpu_id(cpuinfo: str | None = None) -> dict:
    """The CPU's vendor family and model numbers and its widest vector extension, from
    /proc/cpuinfo (`cpuinfo`: its text, for tests); None where it does not say (not Linux, not
    x86). The model name alone ("AMD EPYC", "Intel(R) Xeon(R) Processor" on cloud VMs) does not
    tell one generation from another."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block says it for all
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "family": int(fields["cpu family"]) if "cpu family" in fields else None,
        "model": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "vector_isa": next((isa for isa in VECTOR_ISAS if isa in flags), None),
    }


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """CPU model, cores this process may use and the machine's, Python and library versions."""
    return dict(
        cpu=cpu_model(),
        cores=usable_cores(),
        machine_cores=os.cpu_count(),
        python=platform.python_version(),
        versions={name: _version(name) for name in LIBRARIES},
    )


def describe(env: dict | None) -> str:
    """One line for a page; says so when the result did not record its machine."""
    if not env:
        return "Machine and library versions: not recorded by the run that produced these numbers."
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"Machine: {env['cpu']}, {env['cores']} cores used (of {env['machine_cores']}); "
        f"Python {env['python']}, {versions}."
    )
