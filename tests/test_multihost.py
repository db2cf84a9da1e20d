"""Multi-host equals one host: 2 processes x 2 CPU devices (loopback coordinator, Gloo) against
1 process x 4 devices, on the same tiny OPD + NCA run (`multihost_worker.py`).

The same global batches, the same rollout draws, final params equal up to reduction order, identical
evaluations; and checkpoints that resume on the other topology (2 processes -> 1 and 1 -> 2).
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import TASK_OPTIONS, TINY, _random_model, _save_student

from ctxjax import sharding
from ctxjax.base import tokenizer_corpus
from ctxjax.sampling import SamplingMethod, sample
from ctxjax.tasks import get_task
from ctxjax.vocab import build_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_TIMEOUT_S = 300  # per launch; each takes well under a minute on an idle 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name: str, processes: int, devices_each: int, student: str, runs: list):
    """Runs the worker in `processes` processes of `devices_each` CPU devices; fails with their
    output if any of them fails."""
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"student": student, "runs": runs}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env |= {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")]),
    }
    if processes > 1:
        env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}"}
        env |= {"JAX_NUM_PROCESSES": str(processes)}
    procs = []
    for i in range(processes):
        log = open(tmp_path / f"{name}.{i}.log", "w")  # noqa: SIM115 (closed below)
        proc_env = env | ({"JAX_PROCESS_ID": str(i)} if processes > 1 else {})
        cmd = [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(spec)]
        procs.append((subprocess.Popen(cmd, env=proc_env, stdout=log, stderr=log), log))
    # Poll them together: when one fails, its peers would wait on it until the timeout.
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p, _ in procs):
            break
        time.sleep(0.5)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    failed = [
        f"{name} process {i} (exit {p.returncode}):\n" + _log_tail(tmp_path / f"{name}.{i}.log")
        for i, (p, _) in enumerate(procs)
        if p.returncode != 0
    ]
    assert not failed, "\n".join(failed)


def _log_tail(path, n=3000) -> str:
    return path.read_text()[-n:]


def _result(out_dir):
    with open(os.path.join(out_dir, "result.json")) as f:
        meta = json.load(f)
    return meta, dict(np.load(os.path.join(out_dir, "result.npz")))


def _params(result: dict, prefix: str) -> dict:
    """`final/...` or `check/...` (the params the step-2 step was given) by their path."""
    return {k.removeprefix(prefix): v for k, v in result.items() if k.startswith(prefix)}


def _max_diff(a: dict, b: dict) -> float:
    assert a and a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _assert_same_eval(a: dict, b: dict) -> None:
    """Identical answers, accuracies, Harm and lengths; per-layer cosines, continuous in params that
    agree up to reduction order, within 1e-6."""
    cosines = "layer_cosine"
    assert {k: v for k, v in a.items() if k != cosines} == {
        k: v for k, v in b.items() if k != cosines
    }
    np.testing.assert_allclose(a[cosines], b[cosines], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 x 2 from scratch; 1 x 4 from scratch, then from the 2 x 2 step-2 checkpoint; 2 x 2 from
    the 1 x 4 step-2 checkpoint."""
    root = tmp_path_factory.mktemp("multihost")
    task = get_task("synthetic", **TASK_OPTIONS)
    tokenizer = build_tokenizer(tokenizer_corpus(task, task.sft_records(200, 0)), vocab_size=320)
    student = _save_student(root / "student", TINY, tokenizer)
    out = {k: str(root / k) for k in ("two", "one", "one_from_two", "two_from_one")}
    _launch(root, "two", 2, 2, student, [{"out_dir": out["two"]}])
    two_ckpt = os.path.join(out["two"], "checkpoints")
    _launch(
        root,
        "one",
        1,
        4,
        student,
        [{"out_dir": out["one"]}, {"out_dir": out["one_from_two"], "resume_from": two_ckpt}],
    )
    one_ckpt = os.path.join(out["one"], "checkpoints")
    _launch(
        root,
        "two_from_one",
        2,
        2,
        student,
        [{"out_dir": out["two_from_one"], "resume_from": one_ckpt}],
    )
    return {k: _result(v) for k, v in out.items()}


def test_two_processes_equal_one(runs):
    (meta_two, two), (meta_one, one) = runs["two"], runs["one"]
    assert (meta_two["processes"], meta_two["devices"]) == (2, 4)
    assert (meta_one["processes"], meta_one["devices"]) == (1, 4)
    # The same global batch of 8 at every step (not a per-process batch of 8 each).
    assert two["indices"].shape == (4, 8) and len(np.unique(one["indices"][0])) == 8
    np.testing.assert_array_equal(two["indices"], one["indices"])
    diff = _max_diff(_params(two, "final/"), _params(one, "final/"))
    print(f"max |param diff| 2x2 vs 1x4 after 4 steps: {diff:.3g}")
    assert diff <= 1e-5
    # Steps 3 and 4 alone move the params by far more than that tolerance.
    assert _max_diff(_params(one, "final/"), _params(one, "check/")) > 1e-4
    for name, meta in (("2x2", meta_two), ("1x4", meta_one)):
        shown = {k: v for k, v in meta["after"].items() if k != "samples"}
        print(f"eval after, {name}:", json.dumps(shown, sort_keys=True))
    _assert_same_eval(meta_two["before"], meta_one["before"])
    _assert_same_eval(meta_two["after"], meta_one["after"])


@pytest.mark.parametrize(
    ("resumed", "saver", "straight"),
    [("one_from_two", "two", "one"), ("two_from_one", "one", "two")],
)
def test_checkpoint_resumes_on_another_topology(runs, resumed, saver, straight):
    meta, got = runs[resumed]
    (_, saved), (meta_straight, want) = runs[saver], runs[straight]
    # The restored step-2 params are bitwise those the saving run had at step 2 ...
    assert _max_diff(_params(got, "check/"), _params(saved, "check/")) == 0.0
    # ... the data iterator continues with the same global batches ...
    np.testing.assert_array_equal(got["indices"], want["indices"][2:])
    # ... and the run ends where the uninterrupted one on this topology does.
    diff = _max_diff(_params(got, "final/"), _params(want, "final/"))
    print(f"max |param diff| {resumed} vs {straight}: {diff:.3g}")
    assert diff <= 1e-5
    _assert_same_eval(meta["after"], meta_straight["after"])


def test_rollout_draws_do_not_depend_on_the_mesh():
    """Per-row randomness: the same tokens whether the batch sits on one device or is split over
    8. jax's random bits are a function of the key and the global shape, not of the layout (with
    jax_threefry_partitionable on, the default, and off), so neither is the process count."""
    model = _random_model(TINY, seed=1)
    rng = np.random.default_rng(0)
    ids_BxP = rng.integers(1, TINY.vocab_size, (8, 12)).astype(np.int32)
    mask_BxP = np.ones_like(ids_BxP, bool)
    mask_BxP[::2, :5] = False  # left padding on half the rows
    graphdef, params = nnx.split(model)

    @jax.jit
    def draw(params, ids_BxP, mask_BxP):
        out = sample(
            nnx.merge(graphdef, params),
            ids_BxP,
            mask_BxP,
            jax.random.key(3),
            max_new_tokens=8,
            method=SamplingMethod(temperature=1.0),
            eos_ids=(),
            pad_id=0,
        )
        return out.tokens_BxN

    mesh_one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    tokens = {}
    for name, mesh in (("one", mesh_one), ("data8", sharding.make_mesh(8, 1, 1))):
        batch = sharding.place_batch({"ids_BxP": ids_BxP, "mask_BxP": mask_BxP}, mesh)
        tokens[name] = np.asarray(draw(sharding.shard_params(params, mesh), **batch))
    np.testing.assert_array_equal(tokens["one"], tokens["data8"])
    assert len(np.unique(tokens["one"])) > 8  # real draws, not a constant


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, None),
        # an allocation without a step (salloc shell, sbatch script outside srun): one process
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16"}, "slurm"),
        (
            {"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"},
            None,
        ),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
        ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "SLURM_JOB_ID": "7"}, "explicit"),
    ],
)
def test_distributed_launcher_only_for_more_than_one_process(env, want):
    assert sharding.distributed_launcher(env) == want


def _record_initialize(monkeypatch, env: dict) -> list:
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_WORKER", "MEGASCALE_", "JAX_")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_initialize_called_with_the_explicit_triple_and_not_in_a_bare_allocation(monkeypatch):
    calls = _record_initialize(monkeypatch, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    sharding.maybe_initialize_distributed()
    assert calls == []
    calls = _record_initialize(
        monkeypatch,
        {
            "JAX_COORDINATOR_ADDRESS": "10.1.2.3:1234",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "1",
        },
    )
    sharding.maybe_initialize_distributed()
    assert calls == [dict(coordinator_address="10.1.2.3:1234", num_processes=2, process_id=1)]
    calls = _record_initialize(monkeypatch, {"OMPI_COMM_WORLD_SIZE": "2"})
    sharding.maybe_initialize_distributed()
    assert calls == [{}]  # the launcher's own discovery


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            "JAX_NUM_PROCESSES must be an integer, got 'two'",
        ),
    ],
)
def test_incomplete_explicit_launch_is_one_clear_error(monkeypatch, env, message):
    calls = _record_initialize(monkeypatch, env)
    with pytest.raises(ValueError, match=message):
        sharding.maybe_initialize_distributed()
    assert calls == []
