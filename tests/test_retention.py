"""The retention anchor (`retention.gamma`): its loss against a numpy reference, gamma 0 (or a
weight still 0 under its schedule) bitwise the plain step, draws from the pool only, gradient only
through the student's view under c', resume exactness, the pool's and the config's errors.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import FAST, Interrupted, StepSpy, _cfg, _jsonl_cfg

from ctxjax import hf, train
from ctxjax.checkpoint import Checkpointer
from ctxjax.config import (
    DataConfig,
    LossConfig,
    OptimConfig,
    RetentionConfig,
    RolloutConfig,
    TaskConfig,
    load_config,
)
from ctxjax.data import anchor_pool, encode_record, make_iterator, read_context_pool
from ctxjax.evaluate import retention_split
from ctxjax.model import ModelConfig, create_model
from ctxjax.step import (
    ANCHOR_STREAM,
    StepConfig,
    anchor_batch,
    draw_anchor_prompts,
    gamma_at,
    init_state,
    jit_train_step,
    make_optimizer,
    make_retention_loss,
    make_train_step,
)
from ctxjax.tasks import get_task

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
PAD = 0
B, Q, N = 6, 12, 7
CTX_PROMPT_LENS = [5, 9, 3, 12, 7, 4]  # [c'|x] lengths: every row has its own left padding
RESP_LENS = [7, 2, 5, 1, 6, 4]
# Contexts of the synthetic world with the "seq" family: flip, format and nudge contexts.
MANY = {"families": ["max", "seq"], "max_len": 3}


def _sharpen(model, scale=10.0):
    """Peaked, varied distributions (the normal(0.02) init gives near-uniform logits)."""
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, state))
    return model


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def fixed():
    """A fixed anchor rollout: left-padded [c'|x] prompts, right-padded responses, two models."""
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, CFG.vocab_size, n)) for n in CTX_PROMPT_LENS]
    ids = np.full((B, Q), PAD, np.int32)
    mask = np.zeros((B, Q), bool)
    for i, p in enumerate(prompts):
        ids[i, Q - len(p) :], mask[i, Q - len(p) :] = p, True
    resp = rng.integers(3, CFG.vocab_size, (B, N)).astype(np.int32)
    resp_mask = np.arange(N)[None, :] < np.asarray(RESP_LENS)[:, None]
    student = nnx.split(_sharpen(create_model(CFG, seed=0)), nnx.Param)
    anchor = nnx.split(_sharpen(create_model(CFG, seed=1)), nnx.Param)
    data = anchor_batch(*map(jnp.asarray, (ids, mask, resp, resp_mask)))
    return dict(prompts=prompts, resp=resp, student=student, anchor=anchor, data=data)


def _reference_logits(graphdef, params, prompts, resp):
    """Per row the float64 logits predicting the response tokens, from one forward pass over the
    right-padded [c'|x|y'] (natural positions), sliced by hand."""
    seqs = [list(p) + list(resp[b, : RESP_LENS[b]]) for b, p in enumerate(prompts)]
    width = max(map(len, seqs))
    ids = np.zeros((B, width), np.int32)
    mask = np.zeros((B, width), bool)
    for b, s in enumerate(seqs):
        ids[b, : len(s)], mask[b, : len(s)] = s, True
    logits = np.asarray(nnx.merge(graphdef, params)(ids, attention_mask=mask), np.float64)
    return [logits[b, len(p) - 1 : len(p) - 1 + RESP_LENS[b]] for b, p in enumerate(prompts)]


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_retention_loss_matches_numpy_and_only_the_student_gets_gradient(fixed, chunk_size):
    (s_def, s_params), (a_def, a_params) = fixed["student"], fixed["anchor"]
    fn = make_retention_loss(s_def, a_def, LossConfig(chunk_size=chunk_size))
    count = jnp.float32(sum(RESP_LENS))
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
    (loss, total), (g_student, g_anchor) = grad(s_params, a_params, fixed["data"], count)
    s = _reference_logits(s_def, s_params, fixed["prompts"], fixed["resp"])
    a = _reference_logits(a_def, a_params, fixed["prompts"], fixed["resp"])
    # Reverse KL over the full vocabulary, KL(student || anchor), mean over response tokens.
    per_token = [
        (np.exp(_np_log_softmax(x)) * (_np_log_softmax(x) - _np_log_softmax(y))).sum(-1)
        for x, y in zip(s, a, strict=True)
    ]
    want = np.concatenate(per_token).sum() / sum(RESP_LENS)
    assert want > 0.1  # the two models differ: a loss of 0 would prove nothing
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(float(total), want * sum(RESP_LENS), rtol=2e-5)
    # Gradient reaches the student's view under c' only: the anchor is a constant.
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_anchor))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student)) > 1e-3


def test_gamma_schedule_reuses_the_beta_schedule():
    cfg = RetentionConfig(
        gamma=1.0, gamma_schedule="linear", gamma_start_step=2, gamma_ramp_steps=4
    )
    want = {0: 0.0, 1: 0.0, 2: 0.25, 3: 0.5, 5: 1.0, 40: 1.0}
    for step, value in want.items():
        assert float(gamma_at(cfg, jnp.int32(step))) == pytest.approx(value, abs=1e-7)
    delayed = RetentionConfig(gamma=0.5, gamma_schedule="delayed", gamma_start_step=3)
    assert [float(gamma_at(delayed, jnp.int32(s))) for s in (2, 3)] == [0.0, 0.5]


# --------------------------------------------------------------------------------------------------
# The step: gamma 0 bitwise, pool draws, streams
# --------------------------------------------------------------------------------------------------

K = 3  # pool contexts per row in the step tests


@pytest.fixture(scope="module")
def step_world(fixed):
    rng = np.random.default_rng(5)
    xs = [list(rng.integers(3, CFG.vocab_size, n)) for n in (3, 5, 2, 6, 4, 1)]
    ctxs = [list(rng.integers(3, CFG.vocab_size, n)) for n in range(2, 2 + K + 1)]

    def left(seqs, width):
        ids, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), bool)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :], mask[i, width - len(s) :] = s, True
        return ids, mask

    ids_x, mask_x = left(xs, 8)
    ids_c, mask_c = left([ctxs[0] + x for x in xs], Q)
    pool = [left([c + x for x in xs], Q) for c in ctxs[1:]]
    batch = dict(
        prompt_ids=ids_x,
        prompt_mask=mask_x,
        ctx_prompt_ids=ids_c,
        ctx_prompt_mask=mask_c,
        pool_prompt_ids=np.stack([p[0] for p in pool], axis=1),  # [B, K, Q]
        pool_prompt_mask=np.stack([p[1] for p in pool], axis=1),
    )
    return dict(batch=batch, student=fixed["student"], anchor=fixed["anchor"])


def _steps(w, retention, steps=2, loss=None):
    (s_def, s_params), (a_def, a_params) = w["student"], w["anchor"]
    cfg = StepConfig(
        loss=loss or LossConfig(opd="reverse_kl", beta=0.5),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0),
        rollout=RolloutConfig(max_new_tokens=5),
        total_steps=4,
        micro_batches=1,
        eos_ids=(1,),
        pad_id=PAD,
        retention=retention,
    )
    tx = make_optimizer(cfg.optim, cfg.total_steps)
    state = init_state(nnx.merge(s_def, jax.tree.map(jnp.array, s_params)), tx)[1]
    batch = {k: jnp.asarray(v) for k, v in w["batch"].items()}
    fn = jit_train_step(make_train_step(s_def, a_def, tx, cfg))
    fn = fn.lower(state, a_params, batch, jax.random.key(0)).compile(compiler_options=FAST)
    history = []
    for i in range(steps):
        state, metrics = fn(state, a_params, batch, jax.random.fold_in(jax.random.key(9), i))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_gamma_zero_and_a_weight_still_zero_leave_the_step_bitwise(step_world):
    plain, plain_m = _steps(step_world, RetentionConfig())
    # The anchor computed but weighted 0 (delayed past these steps): its own random stream leaves
    # the rollout's untouched, so parameters and every existing metric are bitwise the same.
    late = RetentionConfig(gamma=0.5, gamma_schedule="delayed", gamma_start_step=10)
    delayed, delayed_m = _steps(step_world, late)
    on, on_m = _steps(step_world, RetentionConfig(gamma=0.5))
    for a, b in zip(_leaves(plain), _leaves(delayed), strict=True):
        np.testing.assert_array_equal(a, b)
    for m, d in zip(plain_m, delayed_m, strict=True):
        assert set(d) == set(m) | {"l_retention", "gamma", "anchor_response_len"}
        for key in m:
            np.testing.assert_array_equal(m[key], d[key], err_msg=key)
        assert float(d["gamma"]) == 0.0 and float(d["l_retention"]) > 0.0
    # With a weight, the anchor changes the update but not the main rollout or its losses.
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(plain), _leaves(on), strict=True))
    for key in ("response_len", "l_opd", "reverse_kl"):
        np.testing.assert_array_equal(plain_m[0][key], on_m[0][key], err_msg=key)
    assert float(on_m[0]["loss"]) == pytest.approx(
        float(on_m[0]["l_opd"] + 0.5 * on_m[0]["l_consistency"] + 0.5 * on_m[0]["l_retention"]),
        rel=1e-5,
    )


def test_anchor_rows_draw_every_pool_context_uniformly_and_nothing_else(step_world):
    batch = step_world["batch"]
    ids = jnp.asarray(batch["pool_prompt_ids"])
    mask = jnp.asarray(batch["pool_prompt_mask"])
    counts = np.zeros(K, int)
    for i in range(200):
        rng = jax.random.split(jax.random.fold_in(jax.random.key(i), ANCHOR_STREAM))[0]
        got_ids, got_mask, k_B = map(np.asarray, draw_anchor_prompts(ids, mask, rng))
        for b, k in enumerate(k_B):
            np.testing.assert_array_equal(got_ids[b], batch["pool_prompt_ids"][b, k])
            np.testing.assert_array_equal(got_mask[b], batch["pool_prompt_mask"][b, k])
        counts += np.bincount(k_B, minlength=K)
    # 1200 draws over 3 contexts: each within 5 standard deviations of 400.
    assert np.all(np.abs(counts - 400) < 5 * np.sqrt(1200 * (1 / 3) * (2 / 3))), counts


# --------------------------------------------------------------------------------------------------
# The pool: from the task (minus distilled and held-out) or a file; the data side's views
# --------------------------------------------------------------------------------------------------


def test_pool_from_task_excludes_distilled_and_held_out():
    contexts = get_task("synthetic", **MANY).contexts()
    pool = anchor_pool(contexts, "careful", held_out=("rev", "words"))
    assert set(pool) == set(contexts) - {"careful", "rev", "words"}
    assert all(pool[k] == contexts[k] for k in pool)
    with pytest.raises(ValueError, match=r"retention\.held_out names \['nope'\]"):
        anchor_pool(contexts, "careful", held_out=("nope",))
    with pytest.raises(ValueError, match=r"retention\.held_out names \['careful'\]"):
        anchor_pool(contexts, "careful", held_out=("careful",))
    with pytest.raises(ValueError, match=r"retention\.held_out holds back the whole pool"):
        anchor_pool(contexts, "careful", held_out=tuple(set(contexts) - {"careful"}))
    with pytest.raises(ValueError, match=r"task has none: set retention\.pool_file"):
        anchor_pool({"careful": contexts["careful"]}, "careful")


def test_pool_file_text_and_jsonl_with_errors_naming_file_and_line(tmp_path):
    text = tmp_path / "pool.txt"
    text.write_text("rule: reverse the sequence\n\nformat: answer in words\n")
    assert read_context_pool(str(text)) == {
        "rule: reverse the sequence": "rule: reverse the sequence",
        "format: answer in words": "format: answer in words",
    }
    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text('{"name": "rev", "context": "rule: reverse"}\n{"context": "be brief"}\n')
    assert read_context_pool(str(jsonl)) == {"rev": "rule: reverse", "be brief": "be brief"}
    pool = anchor_pool({"c": "be careful"}, "c", held_out=("rev",), pool_file=str(jsonl))
    assert pool == {"be brief": "be brief"}
    for content, message in [
        ('{"name": "a", "context": "x"}\n{"text": "y"}\n', r"pool\.jsonl:2: a pool entry is"),
        ('{"context": "x"}\n\n{"context": "x"}\n', r"pool\.jsonl:3: context 'x' is already"),
        ('{"context": "x"}\n[1]\n', r"pool\.jsonl:2"),
    ]:
        jsonl.write_text(content)
        with pytest.raises(ValueError, match=message):
            read_context_pool(str(jsonl))
    text.write_text("be careful\n")
    with pytest.raises(ValueError, match=r"pool\.txt holds the distilled context 'c'"):
        anchor_pool({"c": "be careful"}, "c", pool_file=str(text))
    with pytest.raises(FileNotFoundError, match=r"retention\.pool_file not found: .*nope"):
        read_context_pool(str(tmp_path / "nope"))


def test_data_side_renders_every_pool_context_per_row(folders):
    tokenizer = hf.load_tokenizer(folders["student"])
    task = get_task("synthetic", **MANY)
    pool = tuple(anchor_pool(task.contexts(), "careful", held_out=("rev",)).values())
    cfg = DataConfig(batch_size=4, max_prompt_tokens=24, max_context_prompt_tokens=48, seed=1)
    records = task.train_records("careful", 16, 0)
    it = make_iterator(records, tokenizer, cfg, pool=pool)
    first = next(it)
    state = it.get_state()
    second = next(it)
    assert first["pool_prompt_ids"].shape == (4, len(pool), 48)
    for b, index in enumerate(first["index"]):
        for k, context in enumerate(pool):
            want = encode_record(
                {**records[index], "context": context}, tokenizer, "", cfg, index=0
            )
            np.testing.assert_array_equal(first["pool_prompt_ids"][b, k], want["ctx_prompt_ids"])
            np.testing.assert_array_equal(first["pool_prompt_mask"][b, k], want["ctx_prompt_mask"])
    # Deterministic on resume: a fresh iterator set to the saved state gives the same batch.
    again = make_iterator(records, tokenizer, cfg, pool=pool)
    again.set_state(state)
    resumed = next(again)
    for key in second:
        np.testing.assert_array_equal(second[key], resumed[key])
    # The distilled and the held-out contexts' views are never among the pool's.
    for name in ("careful", "rev"):
        row = encode_record(
            {**records[first["index"][0]], "context": task.contexts()[name]},
            tokenizer,
            "",
            cfg,
            index=0,
        )
        assert not any(
            np.array_equal(row["ctx_prompt_ids"], v) for v in first["pool_prompt_ids"][0]
        )


def test_retention_split_by_pool():
    contexts = {"a": "ta", "b": "tb", "c": "tc"}
    got = retention_split({"a": 0.5, "b": 1.0, "c": 0.25}, contexts, ["ta", "tb"])
    assert got == {"retention_pool": 0.75, "retention_held_out": 0.25}
    assert retention_split({"a": 0.5}, contexts, ["ta"])["retention_held_out"] is None


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"retention\.gamma must be >= 0"):
        load_config(None, ["retention.gamma=-1"])
    with pytest.raises(ValueError, match=r"retention\.gamma_schedule must be one of"):
        load_config(None, ["retention.gamma=1", "retention.gamma_schedule=cosine"])
    with pytest.raises(ValueError, match=r"retention\.gamma_schedule='linear' needs retention\."):
        load_config(None, ["retention.gamma=1", "retention.gamma_schedule=linear"])
    with pytest.raises(ValueError, match=r"retention\.gamma_start_step would be ignored"):
        load_config(None, ["retention.gamma_start_step=3"])
    with pytest.raises(KeyError, match=r"unknown config key 'retention\.gama'"):
        load_config(None, ["retention.gama=1"])
    cfg = load_config(None, ["retention.gamma=0.5", "retention.held_out=[rev, sort]"])
    assert cfg.retention.held_out == ("rev", "sort") and cfg.retention.enabled


# --------------------------------------------------------------------------------------------------
# Through the training loop: set-up errors, evaluation split, resume exactness
# --------------------------------------------------------------------------------------------------


def test_setup_refuses_a_task_without_other_contexts(folders, tmp_path):
    # The JSONL records hold one context: the distilled one.
    cfg = dataclasses.replace(
        _jsonl_cfg(folders, tmp_path / "run"), retention=RetentionConfig(gamma=0.5)
    )
    with pytest.raises(
        ValueError, match=r"distilled 'ctx0', and the task has none: set retention\.pool_file"
    ):
        train.setup(cfg, progress=False)


def _pool_cfg(folders, out_dir):
    pool = folders["root"] / "pool.txt"
    pool.write_text("rule: reverse the sequence\nformat: answer in words\nhint: be brief\n")
    cfg = _jsonl_cfg(folders, out_dir)
    return dataclasses.replace(
        cfg,
        retention=RetentionConfig(gamma=0.5, pool_file=str(pool)),
        data=dataclasses.replace(cfg.data, max_context_prompt_tokens=48),
    )


def test_resume_with_the_anchor_equals_uninterrupted(folders, tmp_path):
    straight = train.setup(_pool_cfg(folders, tmp_path / "straight"), progress=False)
    assert len(straight.anchor_pool) == 3
    straight.step_fn = spy_a = StepSpy(straight.step_fn)
    train.train(straight, progress=False)

    cfg = _pool_cfg(folders, tmp_path / "resumed")
    first = train.setup(cfg, progress=False)
    first.step_fn = StepSpy(first.step_fn, compiled=spy_a.compiled, crash_at=2)
    ckpt = Checkpointer(os.path.join(cfg.train.out_dir, "checkpoints"))
    with pytest.raises(Interrupted):
        train.train(first, progress=False, checkpointer=ckpt)
    ckpt.wait()
    second = train.setup(cfg, progress=False)
    second.step_fn = StepSpy(second.step_fn, compiled=spy_a.compiled)
    train.train(second, resume=True, progress=False)

    want, got = jax.device_get(straight.state), jax.device_get(second.state)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def metrics(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return {r["step"]: r["l_retention"] for r in rows if "l_retention" in r}

    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    # 0 while the student is still the anchor (the first update's learning rate is 0 in warmup).
    assert len(a) == 4 and a == b and a[1] == 0.0 and a[4] > 0


def test_evaluation_splits_retention_by_pool(folders, tmp_path):
    cfg = _cfg(
        folders,
        tmp_path / "run",
        task=TaskConfig(name="synthetic", context="careful", options=dict(MANY)),
        data=DataConfig(batch_size=8, max_prompt_tokens=24, max_context_prompt_tokens=48),
        retention=RetentionConfig(gamma=0.5, held_out=("rev", "words")),
        train=dataclasses.replace(_cfg(folders, tmp_path).train, steps=1),
    )
    run = train.setup(cfg, progress=False)
    assert set(run.anchor_pool) == {"add3", "sort", "drop1", "hint", "pirate"}
    summary = train.train(run, progress=False)
    for when in ("before", "after"):
        ev = summary[when]
        pool = [ev["retention"][k] for k in run.anchor_pool]
        held = [ev["retention"][k] for k in ("rev", "words")]
        assert ev["retention_pool"] == pytest.approx(np.mean(pool))
        assert ev["retention_held_out"] == pytest.approx(np.mean(held))
