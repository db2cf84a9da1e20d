"""ctxjax.step against independent references: full forward passes sliced by hand in numpy, float64
numpy divergences, hand-written gradients and optimizer updates, single-device results.

Compiles are the cost here (seconds each on CPU), so the train-step variants are built once per
module and shared: `A` (NCA with a delayed beta that starts at step 1, one micro-batch, 1-device
mesh) is the reference that the beta=0, micro-batch and 8-device runs are compared with.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from ctxjax import sharding
from ctxjax.config import LossConfig, OptimConfig, RolloutConfig
from ctxjax.model import ModelConfig, create_model
from ctxjax.sampling import SamplingMethod, sample
from ctxjax.step import (
    DistillBatch,
    StepConfig,
    _nonfinite,
    beta_at,
    init_state,
    jit_train_step,
    lr_schedule,
    make_distill_loss,
    make_optimizer,
    make_train_step,
    response_hidden,
    start_rule,
)

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
PAD = 0
B, P, Q, N = 8, 7, 13, 8  # rows; [x] width; [c|x] width (a different left padding); response
PROMPT_LENS = [3, 5, 2, 6, 4, 1, 6, 3]
CONTEXT_LENS = [4, 2, 5, 3, 6, 2, 1, 5]
RESP_LENS = [8, 3, 1, 6, 8, 5, 2, 7]


def _sharpen(model, scale=10.0):
    """Scales the weight matrices so the tiny random model has peaked, varied distributions (the
    normal(0.02) init gives near-uniform logits: tiny KLs and argmax near-ties)."""
    nnx.update(
        model, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, nnx.state(model, nnx.Param))
    )
    return model


def _left_pad(seqs, width):
    ids = np.full((len(seqs), width), PAD, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :], mask[i, width - len(s) :] = s, True
    return ids, mask


def _right_pad(seqs):
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), PAD, np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    return ids, mask


@dataclasses.dataclass
class World:
    graphdef: object
    params: object
    teacher_graphdef: object
    teacher_params: object
    eos: int  # a token row 0 emits first under greedy decoding: rollouts end unevenly
    prompts: list  # [x] token lists
    ctx_prompts: list  # [c|x] token lists
    data: DistillBatch  # the loss's input: left-padded views, response, mask
    count: float


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, params, ids, mask):
    return nnx.merge(graphdef, params)(ids, attention_mask=mask)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    student, teacher = _sharpen(create_model(CFG, seed=0)), _sharpen(create_model(CFG, seed=1))
    # Ids from 3 up: no padding or special-looking ids inside a prompt.
    prompts = [list(rng.integers(3, CFG.vocab_size, n)) for n in PROMPT_LENS]
    ctx_prompts = [
        list(rng.integers(3, CFG.vocab_size, c)) + x
        for c, x in zip(CONTEXT_LENS, prompts, strict=True)
    ]
    resp = rng.integers(3, CFG.vocab_size, (B, N)).astype(np.int32)
    mask = np.arange(N)[None, :] < np.asarray(RESP_LENS)[:, None]
    ids_x, mask_x = _left_pad(prompts, P)
    ids_c, mask_c = _left_pad(ctx_prompts, Q)
    data = DistillBatch(
        prompt_ids_BxP=jnp.asarray(ids_x),
        prompt_mask_BxP=jnp.asarray(mask_x),
        ctx_prompt_ids_BxC=jnp.asarray(ids_c),
        ctx_prompt_mask_BxC=jnp.asarray(mask_c),
        resp_BxN=jnp.asarray(resp),
        resp_mask_BxN=jnp.asarray(mask),
    )
    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    # EOS for the rollouts: row 0's first greedy token, so row 0 stops at once and the others later
    # or never. Computed at the reference forward's shape ([x|y] right-padded): no extra compile.
    width = max(len(x) + n for x, n in zip(prompts, RESP_LENS, strict=True))
    ids, _ = _right_pad([x + [PAD] * (width - len(x)) for x in prompts])
    real = np.arange(width)[None, :] < np.asarray(PROMPT_LENS)[:, None]
    logits = np.asarray(_full_logits(graphdef, params, ids, real))
    eos = int(np.argmax(logits[0, PROMPT_LENS[0] - 1]))
    return World(
        graphdef,
        params,
        teacher_graphdef,
        teacher_params,
        eos,
        prompts,
        ctx_prompts,
        data,
        float(mask.sum()),
    )


def _reference_logits(w: World, graphdef, params, prefixes):
    """Per row, the [n_resp, V] float64 logits that predict the response tokens, from one full
    forward pass over the *right*-padded `[prefix | y]` (natural positions, no left padding
    involved), sliced by hand: the logits at index len(prefix) - 1 + t predict response token t."""
    resp, lens = np.asarray(w.data.resp_BxN), RESP_LENS
    ids, mask = _right_pad([list(p) + list(resp[b, : lens[b]]) for b, p in enumerate(prefixes)])
    logits = np.asarray(_full_logits(graphdef, params, ids, mask), np.float64)
    return [logits[b, len(p) - 1 : len(p) - 1 + lens[b]] for b, p in enumerate(prefixes)]


@pytest.fixture(scope="module")
def ref(world):
    """Reference logits of the three passes: student on [x|y] and [c|x|y], teacher on [c|x|y]."""
    return dict(
        s_nc=_reference_logits(world, world.graphdef, world.params, world.prompts),
        s_c=_reference_logits(world, world.graphdef, world.params, world.ctx_prompts),
        t=_reference_logits(world, world.teacher_graphdef, world.teacher_params, world.ctx_prompts),
    )


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(logits_p, logits_q):
    lp, lq = np_log_softmax(logits_p), np_log_softmax(logits_q)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_jsd(student, teacher, beta):
    ps, pt = np.exp(np_log_softmax(student)), np.exp(np_log_softmax(teacher))
    m = beta * pt + (1 - beta) * ps
    return beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)


def np_sampled_token(student, teacher, tokens):
    """Value of the policy-gradient surrogate: -A * log p_s(y), A = -(log p_s(y) - log p_t(y))."""
    ls = np.take_along_axis(np_log_softmax(student), tokens[:, None], -1)[:, 0]
    lt = np.take_along_axis(np_log_softmax(teacher), tokens[:, None], -1)[:, 0]
    return (ls - lt) * ls


def _token_mean(per_row):
    """Mean over every response token of all rows (the masked mean)."""
    return float(np.concatenate(per_row).sum() / sum(map(len, per_row)))


# --------------------------------------------------------------------------------------------------
# Loss programs (`make_distill_loss`): one compile per loss config, shared by the tests below
# --------------------------------------------------------------------------------------------------

# XLA's cheap backend settings: these tests check semantics, and on CPU compiling is most of their
# cost (the tiny programs run in milliseconds).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)


@pytest.fixture(scope="module")
def program(world):
    """`program(loss_cfg)(params, teacher_params, data, beta)` -> (values, rkl_sum, g_student,
    g_teacher): values = [loss, sum L_OPD, sum L_cons]; each gradient leaf is [3, *param shape], the
    gradient of each of the three values (jacrev), w.r.t. the student and the teacher params."""
    cache = {}

    def get(loss_cfg):
        if loss_cfg not in cache:
            distill_loss = make_distill_loss(world.graphdef, world.teacher_graphdef, loss_cfg)

            def fn(params, teacher_params, data, beta):
                def values(p, tp):
                    loss, (opd, cons, rkl) = distill_loss(
                        p, tp, data, beta, jnp.float32(world.count)
                    )
                    vec = jnp.stack([loss, opd, cons])
                    return vec, (vec, rkl)

                (g_s, g_t), (vec, rkl) = jax.jacrev(values, argnums=(0, 1), has_aux=True)(
                    params, teacher_params
                )
                return vec, rkl, g_s, g_t

            cache[loss_cfg] = _compile(
                fn, world.params, world.teacher_params, world.data, jnp.float32(0.5)
            )
        return cache[loss_cfg]

    return get


def _run(world, program, loss_cfg, beta=0.5, data=None):
    return program(loss_cfg)(
        world.params, world.teacher_params, world.data if data is None else data, jnp.float32(beta)
    )


def _flat(tree, row=None):
    return np.concatenate(
        [np.ravel(np.asarray(x if row is None else x[row])) for x in jax.tree.leaves(tree)]
    )


RKL_NCA = LossConfig(opd="reverse_kl")


# --------------------------------------------------------------------------------------------------
# 1. Alignment: the step's loss against full forwards sliced by hand and float64 numpy KLs
# --------------------------------------------------------------------------------------------------


def test_distill_loss_matches_full_forward_reference(world, ref, program):
    beta = 0.7
    (loss, opd_sum, cons_sum), rkl_sum, _, _ = _run(world, program, RKL_NCA, beta)
    want_opd = _token_mean([np_kl(s, t) for s, t in zip(ref["s_nc"], ref["t"], strict=True)])
    want_nca = _token_mean([np_kl(nc, c) for nc, c in zip(ref["s_nc"], ref["s_c"], strict=True)])
    assert want_opd > 0.05 and want_nca > 0.05  # the views really differ: the check has teeth
    np.testing.assert_allclose(opd_sum / world.count, want_opd, rtol=1e-4)
    np.testing.assert_allclose(rkl_sum / world.count, want_opd, rtol=1e-4)
    np.testing.assert_allclose(cons_sum / world.count, want_nca, rtol=1e-4)
    np.testing.assert_allclose(loss, want_opd + beta * want_nca, rtol=1e-4)


# name: (loss config, numpy per-token OPD of (s_nc, s_c, t, y), numpy consistency of the same)
VARIANTS = {
    "reverse_kl+nca": (RKL_NCA, lambda nc, c, t, y: np_kl(nc, t), lambda nc, c, t, y: np_kl(nc, c)),
    "forward_kl+sym_kl": (
        LossConfig(opd="forward_kl", consistency="sym_kl"),
        lambda nc, c, t, y: np_kl(t, nc),
        lambda nc, c, t, y: np_kl(nc, c) + np_kl(c, nc),
    ),
    "jsd+dual_opd": (
        LossConfig(opd="jsd", jsd_beta=0.3, consistency="dual_opd"),
        lambda nc, c, t, y: np_jsd(nc, t, 0.3),
        lambda nc, c, t, y: np_jsd(c, t, 0.3),
    ),
    # The sampled-token estimator has no full-vocabulary divergence, so DualOPD uses reverse KL.
    "sampled_token+dual_opd": (
        LossConfig(opd="sampled_token", consistency="dual_opd"),
        lambda nc, c, t, y: np_sampled_token(nc, t, y),
        lambda nc, c, t, y: np_kl(c, t),
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loss_variants_match_numpy_finite_grads_frozen_teacher(world, ref, program, name):
    loss_cfg, np_opd, np_cons = VARIANTS[name]
    (loss, opd_sum, cons_sum), _, g_student, g_teacher = _run(world, program, loss_cfg)
    resp = np.asarray(world.data.resp_BxN)
    ys = [resp[b, :n] for b, n in enumerate(RESP_LENS)]
    per_row = list(zip(ref["s_nc"], ref["s_c"], ref["t"], ys, strict=True))

    def cat(f):
        return np.concatenate([f(nc, c, t, y) for nc, c, t, y in per_row])

    want_opd, want_cons = cat(np_opd).mean(), cat(np_cons).mean()
    np.testing.assert_allclose(opd_sum / world.count, want_opd, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(cons_sum / world.count, want_cons, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(loss, want_opd + 0.5 * want_cons, rtol=2e-4, atol=1e-6)
    grads = _flat(g_student)
    assert np.isfinite(grads).all() and np.abs(grads).max() > 1e-4
    # The teacher is a constant: exactly zero gradient from the loss and both of its terms.
    assert np.all(_flat(g_teacher) == 0.0)


# --------------------------------------------------------------------------------------------------
# 2. Empty context: the two student views line up exactly
# --------------------------------------------------------------------------------------------------


def test_empty_context_views_identical_and_nca_zero(world, program):
    # [c|x] holds the same tokens as [x], only left-padded to a different width.
    ids_c, mask_c = _left_pad(world.prompts, Q)
    data = world.data.replace(
        ctx_prompt_ids_BxC=jnp.asarray(ids_c), ctx_prompt_mask_BxC=jnp.asarray(mask_c)
    )

    def both_views(params, d: DistillBatch):
        model = nnx.merge(world.graphdef, params)
        h_x = response_hidden(
            model, d.prompt_ids_BxP, d.prompt_mask_BxP, d.resp_BxN, d.resp_mask_BxN
        )
        h_c = response_hidden(
            model, d.ctx_prompt_ids_BxC, d.ctx_prompt_mask_BxC, d.resp_BxN, d.resp_mask_BxN
        )
        return model.logits(h_x), model.logits(h_c)

    logits_x, logits_c = map(
        np.asarray, _compile(both_views, world.params, data)(world.params, data)
    )
    m = np.asarray(data.resp_mask_BxN)
    np.testing.assert_allclose(logits_x[m], logits_c[m], atol=1e-5)
    (_, opd_sum, cons_sum), _, _, _ = _run(world, program, RKL_NCA, data=data)
    assert opd_sum / world.count > 0.05
    np.testing.assert_allclose(cons_sum / world.count, 0.0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 3. The NCA anchor: gradient of a KL to a *constant* no-context distribution
# --------------------------------------------------------------------------------------------------


def test_nca_gradient_equals_kl_to_constant_anchor(world, ref, program):
    resp = np.asarray(world.data.resp_BxN)
    ids, mask = _right_pad(
        [p + list(resp[b, : RESP_LENS[b]]) for b, p in enumerate(world.ctx_prompts)]
    )
    rows = np.concatenate([[b] * n for b, n in enumerate(RESP_LENS)])
    cols = np.concatenate(
        [len(p) - 1 + np.arange(n) for p, n in zip(world.ctx_prompts, RESP_LENS, strict=True)]
    )
    # p_nc precomputed (float64 numpy, from the reference forward) and fed in as data.
    anchor_logp = jnp.asarray(np_log_softmax(np.concatenate(ref["s_nc"])), jnp.float32)

    def ref_cons(params, anchor_logp):  # sum over response tokens of KL(const p_nc || p_c(params))
        logits = nnx.merge(world.graphdef, params)(
            jnp.asarray(ids), attention_mask=jnp.asarray(mask)
        )
        logq = jax.nn.log_softmax(logits[rows, cols])
        return jnp.sum(jnp.exp(anchor_logp) * (anchor_logp - logq))

    grad_fn = jax.grad(ref_cons)
    g_ref = _flat(_compile(grad_fn, world.params, anchor_logp)(world.params, anchor_logp))
    g_nca = _flat(_run(world, program, RKL_NCA)[2], row=2)
    scale = np.abs(g_ref).max()
    assert scale > 1e-3
    np.testing.assert_allclose(g_nca, g_ref, atol=2e-5 * scale, rtol=1e-3)
    # SymKL has no stop-gradient (it pulls both views): its gradient is something else.
    g_sym = _flat(_run(world, program, VARIANTS["forward_kl+sym_kl"][0])[2], row=2)
    assert np.abs(g_sym - g_ref).max() > 0.1 * scale


# --------------------------------------------------------------------------------------------------
# 4. Chunking the loss over the response changes nothing
# --------------------------------------------------------------------------------------------------


def test_chunked_loss_matches_unchunked(world, program):
    vals0, rkl0, g0, _ = _run(world, program, RKL_NCA)
    # 3 does not divide N = 8: the last chunk is padded.
    vals3, rkl3, g3, _ = _run(world, program, dataclasses.replace(RKL_NCA, chunk_size=3))
    np.testing.assert_allclose(vals3, vals0, rtol=1e-6)
    np.testing.assert_allclose(rkl3, rkl0, rtol=1e-6)
    for row in range(3):  # the gradients of the loss, of L_OPD and of L_NCA
        a, b = _flat(g3, row), _flat(g0, row)
        np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max(), rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The whole jitted train step: beta=0, micro-batches, sharding (shared compiles)
# --------------------------------------------------------------------------------------------------

OPTIM = OptimConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.01, grad_clip=0.0)
GREEDY = RolloutConfig(max_new_tokens=N, temperature=0.0)
# Beta is 0 at step 0 (the with-context pass computed and multiplied by a traced 0) and 0.5 from
# step 1 on, so two steps of this one compile cover both.
DELAYED = LossConfig(opd="reverse_kl", beta=0.5, beta_schedule="delayed", beta_start_step=1)


def _step_cfg(world, loss=DELAYED, micro_batches=1):
    return StepConfig(
        loss=loss,
        optim=OPTIM,
        rollout=GREEDY,
        total_steps=4,
        micro_batches=micro_batches,
        eos_ids=(world.eos,),
        pad_id=PAD,
    )


def _fresh_state(world, tx):
    params = jax.tree.map(jnp.array, world.params)  # a copy: the step donates its state
    return init_state(nnx.merge(world.graphdef, params), tx)[1]


def _run_steps(world, step_cfg, mesh, steps):
    """`steps` train steps on `mesh`, with state, teacher and batch placed the way `train.setup`
    places them. Returns the device state after the last step, and per step the host copy of the
    state and the metrics."""
    tx = make_optimizer(step_cfg.optim, step_cfg.total_steps)
    state = _fresh_state(world, tx)
    state_shardings = sharding.param_shardings(state, mesh)
    state = jax.device_put(state, state_shardings)
    teacher = sharding.shard_params(world.teacher_params, mesh)
    batch = sharding.place_batch(
        dict(
            prompt_ids=np.asarray(world.data.prompt_ids_BxP),
            prompt_mask=np.asarray(world.data.prompt_mask_BxP),
            ctx_prompt_ids=np.asarray(world.data.ctx_prompt_ids_BxC),
            ctx_prompt_mask=np.asarray(world.data.ctx_prompt_mask_BxC),
        ),
        mesh,
    )
    rngs = [jax.random.fold_in(jax.random.key(7), i) for i in range(steps)]
    fn = jit_train_step(
        make_train_step(world.graphdef, world.teacher_graphdef, tx, step_cfg), state_shardings
    )
    fn = fn.lower(state, teacher, batch, rngs[0]).compile(compiler_options=FAST)
    states, history = [], []
    for rng in rngs:
        state, metrics = fn(state, teacher, batch, rng)
        states.append(jax.device_get(state))  # before the next call donates it
        history.append(jax.device_get(metrics))
    return state, states, history


def _one_device_mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def run_a(world):
    """The reference: delayed NCA, one micro-batch, one device; states after steps 1 and 2."""
    _, states, history = _run_steps(world, _step_cfg(world), _one_device_mesh(), 2)
    return dict(states=states, metrics=history)


def _first_moments(state):
    """Adam's first moments: after step 1 exactly (1 - b1) * gradient, a linear record of the
    gradients however Adam's normalization treats them."""
    return [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if ".mu" in jax.tree_util.keystr(path)
    ]


def _assert_same_update(got, want, grad_rtol=1e-5):
    """Same gradients (through the first moments, tight) and the same parameters.

    Adam divides by |g| + 1e-8, so on the rare entry whose gradient is within float noise of zero a
    1e-12 gradient difference moves the update by a visible fraction of the learning rate: every
    parameter must agree within 1e-7, except at most 0.1% of them, which must agree within 2% of
    one learning-rate step.
    """
    mu_got, mu_want = _flat(_first_moments(got)), _flat(_first_moments(want))
    assert mu_got.size and np.abs(mu_want).max() > 0
    np.testing.assert_allclose(
        mu_got, mu_want, rtol=grad_rtol, atol=grad_rtol * np.abs(mu_want).max()
    )
    diff = np.abs(_flat(got.params) - _flat(want.params))
    assert diff.max() <= 0.02 * OPTIM.learning_rate, diff.max()
    assert np.mean(diff > 1e-7) <= 1e-3, np.mean(diff > 1e-7)


def _hand_opd_update(world, response_len):
    """One OPD-only AdamW step written out: greedy rollout, right-padded full forwards gathered at
    hand-computed indices, reverse KL, masked mean, gradient, optax.adamw."""

    def rollout(params, ids, mask):
        return sample(
            nnx.merge(world.graphdef, params),
            ids,
            mask,
            jax.random.key(0),
            max_new_tokens=N,
            method=SamplingMethod(0.0),
            eos_ids=(world.eos,),
            pad_id=PAD,
        )

    args = (world.params, world.data.prompt_ids_BxP, world.data.prompt_mask_BxP)
    out = _compile(rollout, *args)(*args)
    tokens, lens = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    assert float(response_len) == pytest.approx(lens.mean())
    assert len(set(lens.tolist())) > 1  # some rows stopped at EOS: the mask matters

    def gather(prefixes):
        ids, mask = _right_pad([p + list(tokens[b, : lens[b]]) for b, p in enumerate(prefixes)])
        rows = np.concatenate([[b] * n for b, n in enumerate(lens)])
        cols = np.concatenate(
            [len(p) - 1 + np.arange(n) for p, n in zip(prefixes, lens, strict=True)]
        )
        return jnp.asarray(ids), jnp.asarray(mask), rows, cols

    ids_x, mask_x, rows_x, cols_x = gather(world.prompts)
    ids_c, mask_c, rows_c, cols_c = gather(world.ctx_prompts)

    def opd_mean(params, teacher_params):
        teacher = nnx.merge(world.teacher_graphdef, teacher_params)
        logp_t = jax.nn.log_softmax(teacher(ids_c, attention_mask=mask_c)[rows_c, cols_c])
        student = nnx.merge(world.graphdef, params)
        logp_s = jax.nn.log_softmax(student(ids_x, attention_mask=mask_x)[rows_x, cols_x])
        return jnp.mean(jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1))

    grad_fn = jax.value_and_grad(opd_mean)
    loss, grads = _compile(grad_fn, world.params, world.teacher_params)(
        world.params, world.teacher_params
    )
    tx = optax.adamw(OPTIM.learning_rate, b1=OPTIM.b1, b2=OPTIM.b2, weight_decay=OPTIM.weight_decay)
    opt_state = tx.init(world.params)
    updates, opt_state = tx.update(grads, opt_state, world.params)
    return loss, optax.apply_updates(world.params, updates), opt_state


def test_beta_zero_is_plain_opd(world, run_a):
    # loss.beta=0 statically drops the with-context pass ...
    _, (state0,), (m0,) = _run_steps(
        world, _step_cfg(world, LossConfig(opd="reverse_kl", beta=0.0)), _one_device_mesh(), 1
    )
    assert int(state0.step) == 1
    assert float(m0["beta"]) == 0.0 and float(m0["l_consistency"]) == 0.0
    # ... and equals the delayed schedule's step 0, where beta is a traced 0 times a computed pass.
    m_delayed = run_a["metrics"][0]
    assert float(m_delayed["beta"]) == 0.0 and float(m_delayed["l_consistency"]) > 1e-3
    np.testing.assert_allclose(m0["loss"], m_delayed["loss"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m0["grad_norm"], m_delayed["grad_norm"], rtol=1e-6)
    _assert_same_update(state0, run_a["states"][0], grad_rtol=1e-6)
    # ... and equals a hand-written OPD-only AdamW update.
    loss, params, opt_state = _hand_opd_update(world, m0["response_len"])
    np.testing.assert_allclose(m0["loss"], loss, rtol=1e-5)
    _assert_same_update(state0, dataclasses.replace(state0, params=params, opt_state=opt_state))


def test_rest_of_the_step_on_its_own_rollout_is_the_step(world, run_a):
    """What `bench.py gpu` times as the rest of the step (`gpu._rest_fn`: `make_update_step` on
    given response tokens and mask) makes the step's own update when given the rollout the step
    draws: same gradients, parameters and metrics as the whole step (`run_a`, step 1)."""
    from experiments.bench import gpu

    step_cfg = _step_cfg(world)
    tx = make_optimizer(step_cfg.optim, step_cfg.total_steps)
    state = _fresh_state(world, tx)
    batch = dict(
        prompt_ids=world.data.prompt_ids_BxP,
        prompt_mask=world.data.prompt_mask_BxP,
        ctx_prompt_ids=world.data.ctx_prompt_ids_BxC,
        ctx_prompt_mask=world.data.ctx_prompt_mask_BxC,
    )
    rollout = sample(
        nnx.merge(world.graphdef, state.params),
        batch["prompt_ids"],
        batch["prompt_mask"],
        jax.random.fold_in(jax.random.key(7), 0),  # `_run_steps`' first key
        max_new_tokens=step_cfg.rollout.max_new_tokens,
        method=SamplingMethod(temperature=step_cfg.rollout.temperature),
        eos_ids=step_cfg.eos_ids,
        pad_id=step_cfg.pad_id,
    )
    assert int(rollout.mask_BxN.sum()) < rollout.mask_BxN.size  # some rows end early (EOS)
    rest = jax.jit(gpu._rest_fn(world.graphdef, world.teacher_graphdef, tx, step_cfg))
    got, metrics = jax.device_get(
        rest(state, world.teacher_params, batch, rollout.tokens_BxN, rollout.mask_BxN)
    )
    _assert_same_update(got, run_a["states"][0], grad_rtol=1e-6)
    want = run_a["metrics"][0]
    assert set(metrics) == set(want)
    for name in ("loss", "grad_norm", "response_len", "response_tokens"):
        np.testing.assert_allclose(metrics[name], want[name], rtol=1e-6, err_msg=name)


def test_micro_batches_match_one_batch(world, run_a):
    _, states, history = _run_steps(world, _step_cfg(world, micro_batches=2), _one_device_mesh(), 2)
    assert float(history[1]["beta"]) == 0.5 and float(history[1]["l_consistency"]) > 1e-3
    for got, want in zip(history, run_a["metrics"], strict=True):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for got, want in zip(states, run_a["states"], strict=True):
        _assert_same_update(got, want)


def test_sharded_step_matches_single_device(world, run_a):
    mesh = sharding.make_mesh(2, 2, 2)
    state, states, history = _run_steps(world, _step_cfg(world), mesh, 2)
    kernel = state.params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert (
        kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
        and not kernel.sharding.is_fully_replicated
    )
    assert not state.params["embed_tokens"]["embedding"][...].sharding.is_fully_replicated
    # Adam's moments follow their parameter's layout.
    moments = [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if "down_proj" in jax.tree_util.keystr(path)
    ]
    assert len(moments) == 2 * CFG.num_layers  # mu and nu
    assert all(x.sharding.spec == PartitionSpec("tensor", "fsdp") for x in moments)
    for got, want in zip(history, run_a["metrics"], strict=True):
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for got, want in zip(states, run_a["states"], strict=True):
        _assert_same_update(got, want)


# --------------------------------------------------------------------------------------------------
# 6. Schedules against hand values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, want",
    [
        (LossConfig(beta=0.3), {0: 0.3, 1: 0.3, 50: 0.3}),
        (LossConfig(beta=0.3, beta_schedule="constant", beta_start_step=5), {0: 0.3, 9: 0.3}),
        (
            LossConfig(beta=0.8, beta_schedule="delayed", beta_start_step=3),
            {0: 0.0, 2: 0.0, 3: 0.8, 4: 0.8, 100: 0.8},
        ),
        # start 2, ramp 4: the first non-zero step is 2 (beta/4), the full weight from step 5 on.
        (
            LossConfig(beta=1.0, beta_schedule="linear", beta_start_step=2, beta_ramp_steps=4),
            {0: 0.0, 1: 0.0, 2: 0.25, 3: 0.5, 4: 0.75, 5: 1.0, 6: 1.0, 40: 1.0},
        ),
        (
            LossConfig(beta=0.5, beta_schedule="linear", beta_ramp_steps=2),
            {0: 0.25, 1: 0.5, 7: 0.5},
        ),
    ],
)
def test_beta_schedule_hand_values(cfg, want):
    for step, value in want.items():
        assert float(beta_at(cfg, jnp.int32(step))) == pytest.approx(value, abs=1e-7), step


# --------------------------------------------------------------------------------------------------
# The adaptive start rule: NCA switches on once the no-context reverse KL's moving average is low
# --------------------------------------------------------------------------------------------------

ADAPTIVE = dict(opd="reverse_kl", beta=0.5, beta_schedule="adaptive")


def _np_start_rule(kls, decay, threshold):
    """Numpy reference: per step, the latch entering it and the moving average after it."""
    ema, on, latches, emas = 0.0, 0, [], []
    for t, kl in enumerate(kls):
        latches.append(on)
        ema = kl if t == 0 else decay * ema + (1 - decay) * kl
        emas.append(ema)
        on = max(on, int(ema < threshold))
    return latches, emas


def test_start_rule_latches_against_numpy():
    # Falls below 0.5 at step 3 (ema 0.473...), rises back above it later: the latch stays on.
    kls = np.array([1.0, 0.6, 0.4, 0.1, 0.1, 2.0, 3.0, 3.0], np.float32)
    cfg = LossConfig(**ADAPTIVE, beta_start_kl=0.5, beta_kl_ema=0.5)
    latches, emas = _np_start_rule(kls.astype(np.float64), 0.5, 0.5)
    assert latches == [0, 0, 0, 0, 1, 1, 1, 1] and emas[-1] > 0.5  # the case the test is about
    rule = jax.jit(functools.partial(start_rule, cfg))
    ema, on = jnp.float32(123.0), jnp.int32(0)  # step 0 ignores the stored average
    for t, kl in enumerate(kls):
        assert int(on) == latches[t], t
        assert float(beta_at(cfg, jnp.int32(t), on)) == (0.5 if latches[t] else 0.0), t
        ema, on = rule(jnp.int32(t), ema, on, kl)
        assert float(ema) == pytest.approx(emas[t], rel=1e-6), t
    # Another schedule keeps the average (logged) but never latches.
    ema, on = start_rule(LossConfig(beta=0.5), jnp.int32(0), jnp.float32(0), jnp.int32(0), 0.0)
    assert int(on) == 0 and float(ema) == 0.0


def test_adaptive_start_is_plain_opd_until_it_fires(world):
    """Before the rule fires the step is plain OPD (beta=0) bit for bit; it fires on the step the
    numpy moving average says; then the consistency term is on."""
    mesh = _one_device_mesh()
    _, plain_states, plain = _run_steps(
        world, _step_cfg(world, LossConfig(opd="reverse_kl", beta=0.0)), mesh, 4
    )
    kls = [float(m["reverse_kl"]) for m in plain]
    # A threshold just above step 1's average: it fires after step 1 (if the average fell there).
    _, emas = _np_start_rule(kls, 0.5, np.inf)
    assert emas[1] < emas[0], emas
    threshold = emas[1] * (1 + 1e-4)
    latches, _ = _np_start_rule(kls, 0.5, threshold)
    assert latches == [0, 0, 1, 1]
    loss = LossConfig(**ADAPTIVE, beta_start_kl=threshold, beta_kl_ema=0.5)
    _, states, history = _run_steps(world, _step_cfg(world, loss), mesh, 4)
    for t in (0, 1):  # not fired: bitwise plain OPD
        assert float(history[t]["beta"]) == 0.0 and float(history[t]["l_consistency"]) == 0.0
        for name in ("params", "opt_state"):
            for a, b in zip(
                jax.tree.leaves(getattr(states[t], name)),
                jax.tree.leaves(getattr(plain_states[t], name)),
                strict=True,
            ):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{t} {name}")
        for key in set(plain[t]) - {"kl_ema"}:  # the plain run's average has the default decay
            np.testing.assert_array_equal(history[t][key], plain[t][key], err_msg=f"{t} {key}")
    assert [int(s.beta_on) for s in states] == [0, 1, 1, 1]
    for t in (2, 3):  # fired: NCA at full weight, and the update is no longer plain OPD's
        assert float(history[t]["beta"]) == 0.5 and float(history[t]["l_consistency"]) > 1e-3
    assert not np.array_equal(_flat(states[3].params), _flat(plain_states[3].params))


def test_checkpoint_round_trips_the_start_rule_state(world, tmp_path):
    from ctxjax.checkpoint import Checkpointer

    class Iterator:  # the data iterator's part of a checkpoint, trivially
        def __init__(self):
            self.state = {"i": 3}

        def get_state(self):
            return self.state

        def set_state(self, state):
            self.state = state

    tx = make_optimizer(OPTIM, 4)
    state = _fresh_state(world, tx)
    fired = dataclasses.replace(
        state, step=jnp.int32(7), kl_ema=jnp.float32(0.0123), beta_on=jnp.int32(1)
    )
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(7, fired, Iterator(), {"model": {}})
    ckpt.wait()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored, step = Checkpointer(str(tmp_path / "ckpt")).restore(
        abstract, Iterator(), {"model": {}}
    )
    assert step == 7 and int(restored.beta_on) == 1
    assert float(restored.kl_ema) == np.float32(0.0123)


def test_constant_learning_rate_after_warmup():
    """min_lr_ratio 1 holds the peak after warmup exactly (timing apart from strength)."""
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=3, min_lr_ratio=1.0)
    got = [float(lr_schedule(cfg, 50)(t)) for t in range(51)]
    np.testing.assert_allclose(got[:3], [0.0, 1e-2 / 3, 2e-2 / 3], rtol=1e-6)
    assert all(v == np.float32(1e-2) for v in got[3:])


def _hand_lr(step, peak, warmup, total, end):
    if step < warmup:
        return peak * step / warmup
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("warmup, total, want_warmup", [(4, 20, 4), (10, 3, 2), (0, 6, 0)])
def test_learning_rate_warmup_then_cosine(warmup, total, want_warmup):
    cfg = OptimConfig(
        learning_rate=1e-2, warmup_steps=warmup, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=0.0
    )
    # Warmup longer than the run is clamped to total - 1 steps, so the peak is reached.
    want = [_hand_lr(t, 1e-2, want_warmup, total, 1e-3) for t in range(total + 1)]
    got = [float(lr_schedule(cfg, total)(t)) for t in range(total + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    # The optimizer applies that schedule: with a constant gradient Adam's bias-corrected step is
    # exactly 1 per unit of learning rate, so each update is -lr(t).
    tx = make_optimizer(cfg, total)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    for t in range(total):
        updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        np.testing.assert_allclose(
            updates["w"], -want[t], rtol=1e-5, atol=1e-9, err_msg=f"step {t}"
        )


@pytest.mark.parametrize(
    "bad, want", [(None, 0.0), (np.nan, 1.0), (np.inf, 1.0), (-np.inf, 1.0), (3e38, 0.0)]
)
def test_nonfinite_flag_against_numpy(bad, want):
    """The divergence flag is 1.0 exactly when some leaf holds a NaN or an inf (numpy's
    `isfinite`), whatever the other leaves and dtypes; a huge finite value is not one."""
    tree = {
        "a": np.ones((4, 5), np.float32),
        "b": [np.zeros(3, np.float32), np.ones(2, "bfloat16")],
    }
    if bad is not None:
        tree["b"][0][1] = bad
    leaves = jax.tree.leaves(tree)
    assert (not all(np.isfinite(np.asarray(x, np.float32)).all() for x in leaves)) == bool(want)
    assert float(jax.jit(_nonfinite)(jax.tree.map(jnp.asarray, tree))) == want
