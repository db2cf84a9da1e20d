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
