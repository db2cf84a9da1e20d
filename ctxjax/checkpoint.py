"""Orbax checkpoints of a run: train state (params, optimizer state, step), the grain iterator
state and the run config, kept N at a time, written asynchronously. A checkpoint restores on
another number of processes or devices (the state is resharded onto the current mesh).

No rng is stored: step `i` uses `fold_in(key(train.seed), i)`, so a resumed run draws the same
samples as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp

from ctxjax.model import ModelConfig

# Every architecture field: a checkpoint restores only into the model it was written for.
_ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the items one run needs."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self, step: int, state: Any, data_iter: Any, config: dict, *, force: bool = False
    ) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            # The iterator's state as JSON from process 0, not grain's handler: that one writes a
            # file per process named by the process count, which another topology can't restore.
            # Every process iterates the same global batches, so one state serves them all.
            data=ocp.args.JsonSave(data_iter.get_state()),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=force)

    def restore(
        self, abstract_state: Any, data_iter: Any, config: dict, step: int | None = None
    ) -> tuple[Any, int]:
        """Restores the latest (or given) step into `abstract_state`'s structure and shardings.

        Refuses a checkpoint written for a different model architecture, naming what differs.
        """
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        saved_config = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )["config"]
        _check_same_model(saved_config, config, f"{self.directory}/{step}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        data_iter.set_state(restored["data"])
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()


def _check_same_model(saved: dict, current: dict, where: str) -> None:
    saved_model, current_model = saved.get("model", {}), current.get("model", {})
    diff = {
        k: (saved_model.get(k), current_model.get(k))
        for k in _ARCHITECTURE_KEYS
        if saved_model.get(k) != current_model.get(k)
    }
    if diff:
        detail = ", ".join(
            f"model.{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items()
        )
        raise ValueError(f"checkpoint {where} was written for another model ({detail})")
