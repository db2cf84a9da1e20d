"""The training loop: resume equals an uninterrupted run, checkpoints refuse another architecture,
`train.run` writes everything it promises, set-up errors name the key.

A tiny random student saved as an HF folder stands in for the SFT'd base model (no base training).
"""

import dataclasses
import glob
import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxjax import hf, train
from ctxjax.base import tokenizer_corpus
from ctxjax.checkpoint import Checkpointer
from ctxjax.config import (
    DataConfig,
    EvalConfig,
    LossConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)
from ctxjax.model import ModelConfig, Numerics, Transformer
from ctxjax.tasks import get_task
from ctxjax.vocab import build_tokenizer

# Contexts careful and hint; 3 digits keep every evaluated prompt within one 32-token bucket, so
# evaluation compiles its sampler once.
TASK_OPTIONS = {"families": ["max"], "max_len": 3}
TINY = ModelConfig(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
# XLA's cheap backend settings for the step compiled by the tests themselves (semantics are checked,
# and on CPU compiling is most of the cost).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _random_model(model_cfg, seed):
    """A random model like `create_model`'s (normal(0.02) weights, unit norms), filled from numpy:
    eager jax initialization compiles one kernel per parameter shape, seconds on CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    values = jax.tree.map(
        lambda x: (
            np.ones(x.shape, x.dtype)
            if x.ndim == 1
            else rng.normal(0.0, 0.02, x.shape).astype(x.dtype)
        ),
        state,
    )
    return nnx.merge(graphdef, values)


def _save_student(path, model_cfg, tokenizer, seed=0):
    hf.save_model(_random_model(model_cfg, seed), path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_folders(tmp_path_factory):
    """Tiny HF students (the same tokenizer, two architectures) and a JSONL of training records:
    the `folders` fixture (tests/conftest.py) of this module and of the fault tests."""
    root = tmp_path_factory.mktemp("train")
    task = get_task("synthetic", **TASK_OPTIONS)
    tokenizer = build_tokenizer(tokenizer_corpus(task, task.sft_records(200, 0)), vocab_size=320)
    assert len(tokenizer) <= TINY.vocab_size
    records = task.train_records("careful", 64, 0)
    jsonl = root / "train.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({k: r[k] for k in ("context", "prompt", "answer")}) + "\n" for r in records
        )
    )
    return dict(
        student=_save_student(root / "student", TINY, tokenizer),
        wider=_save_student(root / "wider", dataclasses.replace(TINY, hidden_size=48), tokenizer),
        jsonl=str(jsonl),
        root=root,
    )


def _cfg(folders, out_dir, **sections):
    base = dict(
        student=folders["student"],
        task=TaskConfig(name="synthetic", context="careful", options=dict(TASK_OPTIONS)),
        data=DataConfig(batch_size=8, max_prompt_tokens=24, max_context_prompt_tokens=40),
        rollout=RolloutConfig(max_new_tokens=6),
        loss=LossConfig(opd="reverse_kl", beta=0.5),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=1),
        eval=EvalConfig(examples=4, batch_size=4, max_new_tokens=6),
        train=TrainConfig(steps=2, checkpoint_every=0, log_every=1, out_dir=str(out_dir)),
    )
    base.update(sections)
    return RunConfig(**base)


class Interrupted(Exception):
    pass


class StepSpy:
    """Stands in for a run's jitted step: compiles it once (cheap XLA settings, shareable between
    runs of one config), records the prompt ids of every batch it is given, and can simulate a crash
    on its `crash_at`-th call."""

    def __init__(self, step_fn, compiled=None, crash_at=None):
        self.step_fn, self.compiled, self.crash_at = step_fn, compiled, crash_at
        self.prompt_ids = []

    def __call__(self, state, teacher_params, batch, rng):
        if self.crash_at is not None and len(self.prompt_ids) == self.crash_at:
            raise Interrupted
        if self.compiled is None:
            self.compiled = self.step_fn.lower(state, teacher_params, batch, rng).compile(
                compiler_options=FAST
            )
        self.prompt_ids.append(np.asarray(batch["prompt_ids"]))
        return self.compiled(state, teacher_params, batch, rng)


def _jsonl_cfg(folders, out_dir):
    # task "jsonl" without an eval split: no evaluation; just the loop.
    return _cfg(
        folders,
        out_dir,
        task=TaskConfig(name="jsonl"),
        eval=EvalConfig(),  # evaluation settings without an eval split are a config error
        data=DataConfig(
            train_file=folders["jsonl"],
            batch_size=8,
            max_prompt_tokens=24,
            max_context_prompt_tokens=40,
        ),
        train=TrainConfig(steps=4, checkpoint_every=2, log_every=1, out_dir=str(out_dir)),
    )


def test_resume_equals_uninterrupted(folders, tmp_path, caplog):
    straight = train.setup(_jsonl_cfg(folders, tmp_path / "straight"), progress=False)
    straight.step_fn = spy_a = StepSpy(straight.step_fn)
    train.train(straight, progress=False)
    assert len(spy_a.prompt_ids) == 4

    # The same run, crashing when step 2 starts (after the step-2 checkpoint) ...
    cfg = _jsonl_cfg(folders, tmp_path / "resumed")
    first = train.setup(cfg, progress=False)
    first.step_fn = spy_b = StepSpy(first.step_fn, compiled=spy_a.compiled, crash_at=2)
    ckpt = Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints"))
    with pytest.raises(Interrupted):
        train.train(first, progress=False, checkpointer=ckpt)
    ckpt.wait()
    assert ckpt.manager.latest_step() == 2 and len(spy_b.prompt_ids) == 2
    # ... then resumed from scratch (a new process would do the same set-up).
    second = train.setup(cfg, progress=False)
    second.step_fn = spy_c = StepSpy(second.step_fn, compiled=spy_a.compiled)
    with caplog.at_level(logging.INFO, logger="ctxjax"):
        train.train(second, resume=True, progress=False)
    assert len(spy_c.prompt_ids) == 2
    assert "resumed from step 2" in caplog.text

    # The same batches in the same order, and the same final parameters.
    seen = spy_b.prompt_ids + spy_c.prompt_ids
    for i, (a, b) in enumerate(zip(spy_a.prompt_ids, seen, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"batch {i}")
    assert not np.array_equal(spy_a.prompt_ids[2], spy_a.prompt_ids[3])  # the order is not trivial
    assert int(second.state.step) == 4
    want, got = jax.device_get(straight.state), jax.device_get(second.state)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)
    start = jax.device_get(nnx.state(hf.load_model(folders["student"]), nnx.Param))
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(got.params), strict=True)
    )
    assert moved > 1e-4  # the 4 steps did train
    # The resumed run's metrics continue the step count where the checkpoint left off.
    with open(os.path.join(cfg.train.out_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps[-2:] == [3, 4]


def test_checkpoint_of_another_architecture_refuses_to_restore(folders, tmp_path):
    run = train.setup(_jsonl_cfg(folders, tmp_path / "a"), progress=False)
    assert run.model_cfg == hf.config_from_hf(hf.read_hf_config(folders["student"]))
    record = train.run_record(run)  # its `model` section is the loaded student's architecture
    assert record["model"]["hidden_size"] == TINY.hidden_size != run.cfg.model.hidden_size
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(2, run.state, run.data_iter, record)
    # The run's own record restores ...
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state
    )
    _, step = ckpt.restore(abstract, run.data_iter, record)
    assert step == 2
    # ... another architecture's does not, and the error names the key that differs; every
    # ModelConfig field counts, not only the ones that change parameter shapes.
    for field, value, message in [
        ("hidden_size", 48, r"model\.hidden_size: checkpoint 32 vs this run 48"),
        ("rope_theta", 5e5, r"model\.rope_theta: checkpoint 10000\.0 vs this run 500000\.0"),
        ("rope_scaling", ("llama3", 4.0, 1.0, 4.0, 16), r"model\.rope_scaling: checkpoint None"),
        ("mlp_bias", True, r"model\.mlp_bias: checkpoint False vs this run True"),
    ]:
        changed = dataclasses.replace(run.model_cfg, **{field: value})
        with pytest.raises(ValueError, match=message):
            ckpt.restore(
                abstract,
                run.data_iter,
                train.run_record(dataclasses.replace(run, model_cfg=changed)),
            )
    ckpt.wait()


def test_resume_with_another_student_architecture_names_the_difference(folders, tmp_path):
    cfg = _jsonl_cfg(folders, tmp_path / "run")
    run = train.setup(cfg, progress=False)
    ckpt = Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints"), async_save=False)
    ckpt.save(2, run.state, run.data_iter, train.run_record(run))
    ckpt.wait()
    # The same out_dir, resumed with a student folder of another width.
    wider = train.setup(dataclasses.replace(cfg, student=folders["wider"]), progress=False)
    with pytest.raises(ValueError, match=r"model\.hidden_size: checkpoint 32 vs this run 48"):
        train.train(wider, resume=True, progress=False)


def test_run_end_to_end_writes_metrics_summary_tb_and_final(folders, tmp_path, monkeypatch):
    make_step = train.jit_train_step
    monkeypatch.setattr(train, "jit_train_step", lambda *a, **k: StepSpy(make_step(*a, **k)))
    out = tmp_path / "e2e"
    summary = train.run(_cfg(folders, out), progress=False)
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in (
            "loss",
            "l_opd",
            "l_consistency",
            "reverse_kl",
            "response_len",
            "step_time_s",
            "tokens_per_s",
            "beta",
            "grad_norm",
            "lr",
        ):
            assert key in row and np.isfinite(row[key]), key
        assert 1 <= row["response_len"] <= 6
        np.testing.assert_allclose(
            row["loss"], row["l_opd"] + 0.5 * row["l_consistency"], rtol=1e-5
        )
    with open(out / "summary.json") as f:
        saved = json.load(f)
    for when in ("before", "after"):
        for key in ("acc_x", "acc_xc", "harm"):
            assert key in saved[when], (when, key)
            value = saved[when][key]  # None: undefined (harm with nothing right without c)
            assert value is None or 0.0 <= value <= 1.0, (when, key, value)
    assert saved["config"]["loss"]["beta"] == 0.5
    # The student's architecture, not the (unused) default, in the summary and config.json.
    assert saved["config"]["model"]["hidden_size"] == TINY.hidden_size
    with open(out / "config.json") as f:
        assert json.load(f) == saved["config"]
    assert glob.glob(str(out / "tb" / "events.out.tfevents.*"))
    final = hf.load_model(summary["final_dir"])
    assert final.cfg.hidden_size == TINY.hidden_size and final.cfg.vocab_size == TINY.vocab_size
    assert hf.load_tokenizer(summary["final_dir"]).eos_token == "<|im_end|>"
    start = nnx.state(hf.load_model(folders["student"]), nnx.Param)
    moved = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(
            jax.tree.leaves(start), jax.tree.leaves(nnx.state(final, nnx.Param)), strict=True
        )
    )
    assert moved > 1e-4  # the exported model is the trained one


def test_batch_size_not_divisible_by_mesh(folders, tmp_path):
    cfg = _cfg(
        folders,
        tmp_path,
        data=DataConfig(batch_size=6, max_prompt_tokens=24, max_context_prompt_tokens=40),
    )
    with pytest.raises(ValueError, match=r"data\.batch_size=6"):
        train.setup(cfg, progress=False)


def test_unknown_context_names_valid_ones(folders, tmp_path):
    cfg = _cfg(
        folders,
        tmp_path,
        task=TaskConfig(name="synthetic", context="nope", options=dict(TASK_OPTIONS)),
    )
    with pytest.raises(KeyError, match=r"task\.context='nope'.*valid: \['careful', 'hint'\]"):
        train.setup(cfg, progress=False)


def test_setup_honours_numerics(folders, tmp_path):
    """`numerics` reaches student and teacher: bf16 parameters, remat on (no setting is ignored)."""
    numerics = Numerics(param_dtype="bfloat16", compute_dtype="bfloat16", remat=True)
    run = train.setup(
        _cfg(folders, tmp_path, numerics=numerics, teacher=folders["student"]), progress=False
    )
    assert nnx.merge(run.graphdef, run.state.params).numerics == numerics
    assert nnx.merge(run.teacher_graphdef, run.teacher_params).numerics == numerics
    dtypes = {x.dtype for x in jax.tree.leaves(run.state.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, dtypes


def test_train_script_shows_the_library_info_messages():
    """scripts/train.py configures logging (the library does not): ctxjax's INFO messages, such as
    "resumed from step N", reach stderr even though an imported library already gave the root
    logger a handler (a plain `logging.basicConfig` in the library was a no-op because of it)."""
    code = (
        "import runpy, logging; import ctxjax.train; "
        "runpy.run_path('scripts/train.py')['configure_logging'](); "
        "logging.getLogger('ctxjax.train').info('resumed from step %d', 7); "
        "logging.getLogger('some.library').info('not shown')"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert "ctxjax.train: resumed from step 7" in out.stderr
    assert "not shown" not in out.stderr
    # The reproduction's progress lines ("[i/n] run done in Ns") come from experiments' loggers.
    code = (
        "import logging; import ctxjax.train; from ctxjax.logs import configure_logging; "
        "configure_logging('ctxjax', 'experiments'); "
        "logging.getLogger('experiments.runner').info('[1/2] a run done'); "
        "logging.getLogger('some.library').info('not shown')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    assert "experiments.runner: [1/2] a run done" in out.stderr
    assert "not shown" not in out.stderr


def test_jsonl_run_is_evaluated_on_its_held_out_split(folders, tmp_path):
    """A user's JSONL run with a verifier and a held-out fraction gets before/after metrics on
    prompts it never trained on, and records the context text it distilled."""
    cfg = _jsonl_cfg(folders, tmp_path / "run")
    cfg = dataclasses.replace(
        cfg,
        task=TaskConfig(name="jsonl", options={"eval_fraction": 0.25, "verifier": "normalized"}),
        eval=EvalConfig(examples=8, batch_size=8, temperature=0.0, max_new_tokens=6),
        train=dataclasses.replace(cfg.train, steps=2, checkpoint_every=0),
    )
    run = train.setup(cfg, progress=False)
    held_out = {r["prompt"] for r in run.task.eval_split}
    assert held_out and not held_out & {r["prompt"] for r in run.records}
    assert run.cfg.task.context == "ctx0"
    summary = train.train(run, progress=False)
    for view in ("before", "after"):
        assert summary[view]["mode"] == "greedy" and 0.0 <= summary[view]["acc_x"] <= 1.0
    assert summary["context_text"] == run.task.contexts()["ctx0"]
    assert summary["context_text"].startswith("system:")


def test_jsonl_run_without_eval_split_refuses_eval_settings(folders, tmp_path):
    cfg = _jsonl_cfg(folders, tmp_path / "run")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_every=2))
    with pytest.raises(ValueError, match=r"^train\.eval_every would be ignored: this jsonl run"):
        train.setup(cfg, progress=False)


def test_setup_errors_are_one_line_naming_the_value(folders, tmp_path, monkeypatch):
    """A wrong `student=` path, a file for a folder, a `~` path (expanded; one that does not exist
    is named expanded), a batch the 8-device mesh cannot divide, and a token budget too small:
    each a one-line RunRefused naming the value, and all of them before any weight is read."""

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the input was checked")

    monkeypatch.setattr(hf, "load_model", no_weights)
    monkeypatch.setenv("HOME", str(tmp_path))
    a_file = tmp_path / "model.txt"
    a_file.write_text("not a folder")
    cases = [
        (dict(student=str(tmp_path / "nowhere")), rf"not found: {tmp_path}/nowhere$"),
        (dict(student="~/nowhere"), rf"not found: {tmp_path}/nowhere$"),
        (dict(student=str(a_file)), rf"path is a file, not a folder: {a_file}$"),
        (
            dict(data=DataConfig(batch_size=6, max_prompt_tokens=24, max_context_prompt_tokens=40)),
            r"data\.batch_size=6 must be divisible by .* = 8$",
        ),
        (
            dict(data=DataConfig(batch_size=8, max_prompt_tokens=4, max_context_prompt_tokens=40)),
            r"more than data\.max_prompt_tokens=4",
        ),
    ]
    for i, (sections, message) in enumerate(cases):
        cfg = _cfg(folders, tmp_path / f"run{i}", **sections)
        with pytest.raises(train.RunRefused) as e:
            train.run(cfg, progress=False)
        text = str(e.value)
        assert "\n" not in text and re.search(message, text), (sections, text)
    # `~` reaches the student folder itself (up to the weights, stubbed out here).
    os.symlink(folders["student"], tmp_path / "student")
    with pytest.raises(AssertionError, match="weights were read"):
        train.setup(_cfg(folders, tmp_path / "home", student="~/student"), progress=False)


def test_large_unrolled_step_warns_naming_the_memory_settings(monkeypatch, caplog):
    n = TINY.num_params()
    with caplog.at_level(logging.WARNING, logger="ctxjax.train"):
        train.warn_step_memory(Numerics(), TINY)  # far below the threshold: quiet
        assert not caplog.records
        monkeypatch.setattr(train, "LARGE_MODEL_PARAMS", n)
        train.warn_step_memory(Numerics(scan_layers=True, remat=True), TINY)  # already lean
        assert not caplog.records
        train.warn_step_memory(Numerics(remat=True), TINY)
    (record,) = caplog.records
    assert f"{n / 1e6:.0f}M-parameter" in record.message
    assert "numerics.scan_layers=false numerics.remat=true" in record.message
