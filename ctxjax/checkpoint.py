"""Orbax checkpoints of a run: train state (params, optimizer state, step), the grain iterator
state and the run config, kept N at a time, written asynchronously (or not: `async_save`). A
checkpoint restores on another number of processes or devices (the state is resharded onto the
current mesh).

The state is written without compression. Orbax's default zstd held host buffers about the size of
the state while it wrote (docs/memory.md), the largest part of a real-model CPU run's peak memory,
to save a few percent of disk on fp32 weights and moments, which hardly compress. Checkpoints
written compressed still restore (the codec is in their metadata).

No rng is stored: step `i` uses `fold_in(key(train.seed), i)`, so a resumed run draws the same
samples as an uninterrupted one.

Integrity: sealing a step writes the sha256 of each of its files into `<step>/ctxjax_sha256.json`
(Orbax checks neither contents nor sizes: flipped bytes restore silently). A synchronous save is
sealed before `save` returns; an asynchronous one once the next step is dispatched
(`seal_pending`), its write overlapping that step. A restore verifies the manifest and falls back
to the newest intact step, naming the bad ones. A step without a manifest (the run stopped between
the write and its sealing) is never restored by default: only when asked for by step with
`unverified=True`.
Newer steps than the one restored are never deleted: they move to a folder of their own under
`<dir>.set_aside/`, one per resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from ctxjax.model import ModelConfig
from ctxjax.run_dir import RunRefused, new_aside_dir, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "ctxjax_sha256.json"

# Every architecture field: a checkpoint restores only into the model it was written for.
_ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class CheckpointError(RunRefused):
    """No usable checkpoint where one was asked for; the message is one line naming the path."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir` but the manifest, as sorted relative paths."""
    found = []
    for root, _, names in os.walk(step_dir):
        found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in found if f != MANIFEST)


def write_manifest(step_dir: str) -> None:
    write_json_atomic(
        os.path.join(step_dir, MANIFEST),
        {name: _sha256(os.path.join(step_dir, name)) for name in _files(step_dir)},
    )


def verify(step_dir: str) -> str | None:
    """None if every file matches the manifest, else what is wrong (one line, naming the file).

    "unsealed": no manifest (the run stopped between the save and its sealing).
    """
    try:
        with open(os.path.join(step_dir, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "unsealed"
    except ValueError:
        return f"corrupt manifest {os.path.join(step_dir, MANIFEST)}"
    for name, digest in manifest.items():
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"missing file {path}"
        if _sha256(path) != digest:
            return f"checksum mismatch in {path} ({os.path.getsize(path)} bytes)"
    return None


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the items one run needs."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers=dict(
                state=ocp.PyTreeCheckpointHandler(use_compression=False),
                data=ocp.JsonCheckpointHandler(),
                config=ocp.JsonCheckpointHandler(),
            ),
        )
        self.async_save = async_save
        self._unsealed: list[int] = []  # saved steps whose manifest is not written yet
        # Where this run's restore moved the newer steps (and where the metric rows past the
        # restored step go): None until something is set aside.
        self.aside_dir: str | None = None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(
        self, step: int, state: Any, data_iter: Any, config: dict, *, force: bool = False
    ) -> None:
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            # The iterator's state as JSON from process 0, not grain's handler: that one writes a
            # file per process named by the process count, which another topology can't restore.
            # Every process iterates the same global batches, so one state serves them all.
            data=ocp.args.JsonSave(data_iter.get_state()),
            config=ocp.args.JsonSave(config),
        )
        # Orbax waits for the previous async save before starting one anyway: seal it now.
        self.wait()
        if self.manager.save(step, args=args, force=force):
            self._unsealed.append(step)
        if not self.async_save:  # written already: sealed before the run goes on
            self.wait()

    def seal_pending(self) -> None:
        """Waits for the save in flight, if any, and seals it. The loop calls it once the step
        after a save is dispatched: the write overlaps that step, and the saved step is sealed
        before the run goes further."""
        if self._unsealed:
            self.wait()

    def restore(
        self,
        abstract_state: Any,
        data_iter: Any,
        config: dict,
        step: int | None = None,
        *,
        unverified: bool = False,
    ) -> tuple[Any, int]:
        """Restores the newest intact step (or `step`) into `abstract_state`'s structure and
        shardings. A corrupt or unsealed step is skipped with a warning naming it; a chosen `step`
        that is corrupt is an error, and so is an unsealed one unless `unverified`. Newer steps
        than the one restored are moved to a new folder under `<dir>.set_aside/` (Orbax would
        skip every later save at or below them), never over an earlier one.

        Refuses a checkpoint written for a different model architecture, naming what differs.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
        if unverified and step is None:
            raise CheckpointError("--unverified restores one chosen step: add --resume-step N")
        bad = []
        for candidate in steps if step is None else [step]:
            where = self.step_dir(candidate)
            problem = verify(where)
            if problem == "unsealed":
                if unverified:
                    log.warning(
                        "checkpoint %s has no checksum manifest: restoring it unverified, as "
                        "asked (--unverified)",
                        where,
                    )
                    problem = None
                else:
                    problem = (
                        f"no checksum manifest (the run stopped before sealing step "
                        f"{candidate}); restore it anyway with --resume-step {candidate} "
                        f"--unverified"
                    )
            if problem is None:
                saved_config = self.manager.restore(
                    candidate, args=ocp.args.Composite(config=ocp.args.JsonRestore())
                )["config"]
                _check_same_model(saved_config, config, where)
                try:
                    restored = self.manager.restore(
                        candidate,
                        args=ocp.args.Composite(
                            state=ocp.args.PyTreeRestore(
                                abstract_state,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(
                                    abstract_state
                                ),
                            ),
                            data=ocp.args.JsonRestore(),
                        ),
                    )
                except Exception as e:  # any failure to read is a corrupt step
                    problem = (
                        f"cannot restore: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                    )
            if problem is None:
                self._set_aside([s for s in steps if s > candidate], candidate)
                data_iter.set_state(restored["data"])
                return restored["state"], candidate
            log.warning("checkpoint %s is unusable (%s)", where, problem)
            bad.append(f"{where}: {problem}")
        raise CheckpointError(f"no intact checkpoint to resume from: {'; '.join(bad)}")

    def _set_aside(self, steps: list[int], restored: int) -> None:
        if not steps or jax.process_index() != 0:
            return
        self.aside_dir = new_aside_dir(self.directory + ".set_aside", restored)
        for s in steps:
            target = os.path.join(self.aside_dir, str(s))
            shutil.move(self.step_dir(s), target)
            log.warning("moved checkpoint %s aside to %s", self.step_dir(s), target)
        self.manager.reload()

    def wait(self) -> None:
        """Waits for the async save, then writes the checksums of every step saved since."""
        self.manager.wait_until_finished()
        for step in self._unsealed:
            if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
                write_manifest(self.step_dir(step))
        self._unsealed = []


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
        raise CheckpointError(f"checkpoint {where} was written for another model ({detail})")
    # The layers' layout is part of the saved state's structure (stacked [num_layers, ...] arrays
    # or one subtree per layer); Orbax cannot restore one into the other, and would report every
    # intact step as unreadable. Records from before the key existed are unrolled.
    saved_scan = saved.get("numerics", {}).get("scan_layers", False)
    current_scan = current.get("numerics", {}).get("scan_layers", False)
    if saved_scan != current_scan:
        layout = "stacked" if saved_scan else "one by one"
        raise CheckpointError(
            f"checkpoint {where} holds the layers {layout} (numerics.scan_layers="
            f"{str(saved_scan).lower()}), this run has numerics.scan_layers="
            f"{str(current_scan).lower()}: resume with numerics.scan_layers="
            f"{str(saved_scan).lower()} (a run keeps the layout it started with)"
        )
