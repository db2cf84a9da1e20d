"""Cross-size distillation: a larger teacher (same tokenizer) distils a smaller student.

The teacher's scores inside the step are checked against an independent reference: HF transformers'
forward of the teacher's and the student's folders, and the reverse KL computed in numpy.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import hf_logits
from test_train import TINY, StepSpy, _cfg, _save_student

from ctxjax import hf, train
from ctxjax.config import BaseModelConfig, LossConfig, RunConfig, TaskConfig, load_config
from ctxjax.step import distill_batch, make_distill_loss
from experiments.grid import load_grid, plan

# Twice the student's depth and a wider residual stream: another architecture, the same tokenizer.
LARGER = dataclasses.replace(TINY, num_layers=4, hidden_size=48, intermediate_size=96)


@pytest.fixture(scope="module")
def teacher(folders):
    tokenizer = hf.load_tokenizer(folders["student"])
    return _save_student(folders["root"] / "larger_teacher", LARGER, tokenizer, seed=7)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_reverse_kl(student_logits, teacher_logits):
    ls, lt = _log_softmax(student_logits), _log_softmax(teacher_logits)
    return (np.exp(ls) * (ls - lt)).sum(-1)


def _response_logits(path, prompt_ids, prompt_mask, resp):
    """HF logits predicting each response token, one unpadded row at a time: [B, N, V]."""
    rows = []
    for ids, mask, r in zip(prompt_ids, prompt_mask, resp, strict=True):
        seq = np.concatenate([ids[mask.astype(bool)], r])[None]
        p = int(mask.sum())
        rows.append(hf_logits(path, seq)[0, p - 1 : p - 1 + len(r)])
    return np.stack(rows)


def test_step_scores_come_from_the_larger_teacher(folders, teacher, tmp_path):
    run = train.setup(_cfg(folders, tmp_path / "x", teacher=teacher), progress=False)
    assert nnx.merge(run.teacher_graphdef, run.teacher_params).cfg == LARGER
    batch = {k: np.asarray(v)[:4] for k, v in next(run.data_iter).items()}
    resp = np.random.default_rng(0).integers(10, 300, size=(4, 5)).astype(np.int32)
    data = distill_batch(batch, jnp.asarray(resp), jnp.ones(resp.shape, bool))
    loss_fn = make_distill_loss(
        run.graphdef, run.teacher_graphdef, LossConfig(opd="reverse_kl", beta=0.0)
    )
    loss, (opd_sum, _, rkl_sum) = jax.jit(loss_fn)(
        run.state.params, run.teacher_params, data, jnp.float32(0.0), jnp.float32(resp.size)
    )
    t_logits = _response_logits(teacher, batch["ctx_prompt_ids"], batch["ctx_prompt_mask"], resp)
    s_logits = _response_logits(folders["student"], batch["prompt_ids"], batch["prompt_mask"], resp)
    expected = _np_reverse_kl(s_logits, t_logits)
    np.testing.assert_allclose(float(rkl_sum), expected.sum(), rtol=2e-4)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=2e-4)
    np.testing.assert_allclose(float(opd_sum), expected.sum(), rtol=2e-4)  # OPD = full reverse KL
    # The student against its own copy scores differently: the number above is the teacher's.
    own = _np_reverse_kl(
        s_logits,
        _response_logits(
            folders["student"], batch["ctx_prompt_ids"], batch["ctx_prompt_mask"], resp
        ),
    )
    assert abs(own.sum() - expected.sum()) > 1e-3 * expected.sum()


def test_run_with_a_larger_teacher_trains(folders, teacher, tmp_path, monkeypatch):
    make_step = train.jit_train_step
    monkeypatch.setattr(train, "jit_train_step", lambda *a, **k: StepSpy(make_step(*a, **k)))
    out = tmp_path / "xsize"
    summary = train.run(_cfg(folders, out, teacher=teacher), progress=False)
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["reverse_kl"]) and r["reverse_kl"] > 0 for r in rows)
    assert summary["config"]["teacher"] == teacher
    final = hf.load_model(summary["final_dir"])
    assert final.cfg.num_layers == TINY.num_layers  # the student is trained, not the teacher


def test_teacher_with_another_tokenizer_is_refused(folders, tmp_path):
    from ctxjax.base import tokenizer_corpus
    from ctxjax.tasks import get_task
    from ctxjax.vocab import build_tokenizer

    task = get_task("synthetic", families=["sum"], max_len=3)
    other = build_tokenizer(tokenizer_corpus(task, task.sft_records(50, 1)), vocab_size=300)
    path = _save_student(tmp_path / "other", LARGER, other)
    with pytest.raises(ValueError, match=r"teacher .* vs student .*: tokenizers differ"):
        train.setup(_cfg(folders, tmp_path / "x", teacher=path), progress=False)


def test_base_teacher_names_the_task_base_model_of_another_size(tmp_path, monkeypatch):
    built = []

    def fake_build(task_name, options, model_cfg, base_cfg, **kw):
        built.append((task_name, model_cfg.num_layers, model_cfg.hidden_size))
        return f"/bases/{task_name}-{model_cfg.num_layers}"

    monkeypatch.setattr(train, "build_or_reuse_base", fake_build)
    cfg = RunConfig(
        teacher="base:medium",
        task=TaskConfig(name="synthetic"),
        base=BaseModelConfig(cache_dir=str(tmp_path)),
    )
    assert train.resolve_teacher(cfg, progress=False) == "/bases/synthetic-4"
    assert built == [("synthetic", 4, 64)]
    assert train.resolve_teacher(dataclasses.replace(cfg, teacher="/a/folder")) == "/a/folder"
    with pytest.raises(ValueError, match=r"teacher=base:huge: unknown size 'huge'; valid"):
        train.resolve_teacher(dataclasses.replace(cfg, teacher="base:huge"))
    with pytest.raises(ValueError, match=r"the student must be too"):
        train.resolve_teacher(dataclasses.replace(cfg, student="/s"))


def test_grid_cross_size_cells_plan_the_small_student_under_the_medium_base():
    grid = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/grids/reproduce.yaml")
    specs = [s for s in plan(load_grid(grid)) if "xsize" in s.task]
    assert specs and {s.size for s in specs} == {"small"}
    assert {s.variant for s in specs} == {"opd", "nca"}
    for spec in specs:
        cfg = load_config(None, list(spec.overrides))
        assert cfg.teacher == "base:medium" and cfg.model.num_layers == 2 and not cfg.student
