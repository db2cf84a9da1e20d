"""ctxjax: on-policy context distillation with No-Context Anchoring (NCA) in JAX/Flax NNX.

The public surface is `__all__` (README, "Public API"): the user-facing submodules and the names
most programs need, each imported on first use (PEP 562 `__getattr__`). `import ctxjax` itself
loads no submodule, so `import ctxjax.step` pays only for what the step imports.
"""

from __future__ import annotations

import importlib
from typing import Any

# The submodules a user imports; `from ctxjax import hf` works without this list, which makes them
# attributes of the package and part of `__all__`.
_SUBMODULES = (
    "config",
    "model",
    "hf",
    "sampling",
    "losses",
    "step",
    "data",
    "tasks",
    "evaluate",
    "metrics",
    "train",
)

# Public name -> the submodule that defines it.
_NAMES = {
    "load_config": "config",
    "RunConfig": "config",
    "ModelConfig": "model",
    "Numerics": "model",
    "Transformer": "model",
    "load_model": "hf",
    "load_tokenizer": "hf",
    "render_chat": "hf",
    "export_pretrained": "hf",
    "generate": "sampling",
    "sample": "sampling",
    "SamplingMethod": "sampling",
    "OPD_LOSSES": "losses",
    "CONSISTENCY_LOSSES": "losses",
    "masked_mean": "losses",
    "make_train_step": "step",
    "make_distill_loss": "step",
    "get_task": "tasks",
}

__all__ = [*_SUBMODULES, *_NAMES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    globals()[name] = value  # resolved once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
