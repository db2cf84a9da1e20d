"""One process of the multi-host test (`test_multihost.py`): a tiny OPD + NCA run of 4 steps.

    python tests/multihost_worker.py SPEC.json

SPEC: {"student": folder, "runs": [{"out_dir": ..., "resume_from": checkpoint dir or null}, ...]}.
Each run starts from scratch, or copies step 2 of `resume_from` into its own checkpoint folder and
resumes there. The process count and devices come from the environment (JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID, XLA_FLAGS). Process 0 writes `<out_dir>/result.npz` (the global
batch indices of every step, the params the step-2 step was given, the final params) and
`<out_dir>/result.json` (the evaluations before and after).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from test_train import FAST, TASK_OPTIONS

from ctxjax import sharding, train
from ctxjax.config import (
    DataConfig,
    EvalConfig,
    LossConfig,
    MeshConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)

CHECKED_STEP = 2  # the checkpoint the resumed runs start from


def run_config(student: str, out_dir: str) -> RunConfig:
    return RunConfig(
        student=student,
        task=TaskConfig(name="synthetic", context="careful", options=dict(TASK_OPTIONS)),
        # Parameters and optimizer state sharded over all 4 devices, so across the processes (as
        # on a pod with configs/hf_gpu.yaml); the batch is split over the same 4.
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(batch_size=8, max_prompt_tokens=24, max_context_prompt_tokens=40),
        rollout=RolloutConfig(max_new_tokens=6),  # sampled at temperature 1
        loss=LossConfig(opd="reverse_kl", beta=0.5),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
        eval=EvalConfig(examples=4, batch_size=4, max_new_tokens=6),
        train=TrainConfig(steps=4, checkpoint_every=CHECKED_STEP, log_every=1, out_dir=out_dir),
    )


def gather(tree):
    """Host numpy copies of global arrays, whichever process holds which part."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


class Recorder:
    """Stands in for the run's jitted step: compiles it once with cheap XLA settings (shared by the
    runs of this process) and records every global batch and the params the step-2 step is given."""

    compiled = None

    def __init__(self, step_fn):
        self.step_fn, self.indices, self.params_at_check = step_fn, [], None

    def __call__(self, state, teacher_params, batch, rng):
        if Recorder.compiled is None:
            lowered = self.step_fn.lower(state, teacher_params, batch, rng)
            Recorder.compiled = lowered.compile(compiler_options=FAST)
        self.indices.append(gather(batch["index"]))
        if int(gather(state.step)) == CHECKED_STEP:  # before the step donates the state
            self.params_at_check = gather(state.params)
        return Recorder.compiled(state, teacher_params, batch, rng)


def one_run(student: str, out_dir: str, resume_from: str | None) -> None:
    if resume_from and jax.process_index() == 0:
        src = os.path.join(resume_from, str(CHECKED_STEP))
        shutil.copytree(src, os.path.join(out_dir, "checkpoints", str(CHECKED_STEP)))
    multihost_utils.sync_global_devices("checkpoint copied")
    run = train.setup(run_config(student, out_dir), progress=False)
    run.step_fn = recorder = Recorder(run.step_fn)
    summary = train.train(run, resume=bool(resume_from), progress=False)
    params = gather(run.state.params)
    if jax.process_index() != 0:
        return
    leaves = {
        f"final/{jax.tree_util.keystr(path)}": leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    leaves |= {
        f"check/{jax.tree_util.keystr(path)}": leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(recorder.params_at_check)
    }
    np.savez(os.path.join(out_dir, "result.npz"), indices=np.stack(recorder.indices), **leaves)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(
            {
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "before": summary.get("before"),
                "after": summary["after"],
            },
            f,
            default=float,
        )


def main(spec_path: str) -> None:
    sharding.maybe_initialize_distributed()  # before anything touches a device
    with open(spec_path) as f:
        spec = json.load(f)
    for one in spec["runs"]:
        one_run(spec["student"], one["out_dir"], one.get("resume_from"))


if __name__ == "__main__":
    main(sys.argv[1])
