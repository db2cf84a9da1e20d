"""The pure, jit-compiled OPD + NCA train step.

    train_step(state, teacher_params, batch, rng) -> (state, metrics)
    (`make_train_step`: step 1, then `make_update_step`: steps 2-6 on that rollout)

1. sample      y ~ p_student(. | x)                 (no gradient: the tokens are data)
2. teacher     log p_teacher(. | c, x, y<t)         (stop_gradient)
3. student     log p_student(. | x, y<t)            (gradient from L_OPD)
4. student     log p_student(. | c, x, y<t)         (gradient from the consistency term;
                                                     skipped when beta == 0: plain OPD exactly)
5. loss        L = L_OPD(3 || 2) + beta(step) * D(3, 4[, 2])   fp32, mean over response tokens
   retention   (only with retention.gamma > 0) y' ~ p_student(. | c', x) for a context c' drawn
               per row from the anchor pool, L += gamma(step) * reverse KL(student || frozen
               teacher) on [c' | x | y'], full vocabulary, mean over the anchor's response tokens
6. update      optax

The three passes see the same response tokens. `[x | y]` and `[c | x | y]` are built from
left-padded prompts with the response appended, and positions are `cumsum(mask) - 1`, so response
token t sits at RoPE position len(prompt) + t in its own view. Only response positions are
projected to the vocabulary, optionally in rematerialized chunks, so no `[B, L, V]` logits are ever
materialized.

The loss is `make_distill_loss`: `teacher_targets` (step 2) then `make_student_loss` (steps 3-5)
on a `DistillBatch`; the per-token losses come by name from the registry in `ctxjax.losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ctxjax import losses
from ctxjax.config import LossConfig, OptimConfig, RetentionConfig, RolloutConfig
from ctxjax.model import Transformer, Unembedding
from ctxjax.sampling import SampleOutput, SamplingMethod, sample


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of the student's nnx.Param variables
    opt_state: Any
    # `start_rule`'s state: the moving average of the no-context reverse KL to the teacher
    # (float32), and 1 once loss.beta_schedule="adaptive" has switched the consistency term on.
    kl_ema: jax.Array
    beta_on: jax.Array  # int32 scalar, latched


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio * learning_rate`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.learning_rate,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, with global-norm clipping."""
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay
        )
    )
    return optax.chain(*parts)


def scheduled_weight(
    weight: float, schedule: str, start_step: int, ramp_steps: int, step: jax.Array
) -> jax.Array:
    """A loss weight at `step`: constant, delayed (0 before the start), or linear ramp."""
    step = jnp.asarray(step, jnp.float32)
    if schedule == "constant":
        return jnp.asarray(weight, jnp.float32)
    if schedule == "delayed":
        return jnp.where(step >= start_step, weight, 0.0).astype(jnp.float32)
    frac = (step - start_step + 1) / ramp_steps
    return (weight * jnp.clip(frac, 0.0, 1.0)).astype(jnp.float32)


def beta_at(cfg: LossConfig, step: jax.Array, beta_on: jax.Array | int = 0) -> jax.Array:
    """The consistency weight at `step` (`scheduled_weight` of the `loss.beta*` keys); under the
    "adaptive" schedule, `beta` once `start_rule` has latched `beta_on`, else 0."""
    if cfg.beta_schedule == "adaptive":
        return jnp.where(jnp.asarray(beta_on) > 0, cfg.beta, 0.0).astype(jnp.float32)
    return scheduled_weight(
        cfg.beta, cfg.beta_schedule, cfg.beta_start_step, cfg.beta_ramp_steps, step
    )


def start_rule(
    cfg: LossConfig, step: jax.Array, kl_ema: jax.Array, beta_on: jax.Array, reverse_kl: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The next `(kl_ema, beta_on)` after a step whose no-context reverse KL to the teacher was
    `reverse_kl`: the moving average starts at step 0's value; `beta_on` latches to 1 once the
    average is below `loss.beta_start_kl` ("adaptive" schedule; otherwise it stays 0)."""
    decay = jnp.float32(cfg.beta_kl_ema)
    reverse_kl = jnp.asarray(reverse_kl, jnp.float32)
    ema = jnp.where(step == 0, reverse_kl, decay * kl_ema + (1.0 - decay) * reverse_kl)
    if cfg.beta_schedule != "adaptive":
        return ema, beta_on
    fired = (ema < cfg.beta_start_kl).astype(beta_on.dtype)
    return ema, jnp.maximum(beta_on, fired)


def gamma_at(cfg: RetentionConfig, step: jax.Array) -> jax.Array:
    """The retention anchor's weight at `step` (`scheduled_weight` of the `retention.gamma*`)."""
    return scheduled_weight(
        cfg.gamma, cfg.gamma_schedule, cfg.gamma_start_step, cfg.gamma_ramp_steps, step
    )


def init_state(model: Transformer, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        kl_ema=jnp.zeros((), jnp.float32),
        beta_on=jnp.zeros((), jnp.int32),
    )


@struct.dataclass
class DistillBatch:
    """The loss's input: both left-padded prompt views and the sampled response (tokens are data).

    `[x]` is `prompt_*` (width P), `[c | x]` is `ctx_prompt_*` (width C); the response is
    right-padded, `resp_mask_BxN` True up to and including the first EOS.
    """

    prompt_ids_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    ctx_prompt_ids_BxC: jax.Array
    ctx_prompt_mask_BxC: jax.Array
    resp_BxN: jax.Array
    resp_mask_BxN: jax.Array


def distill_batch(batch: dict, resp_BxN: jax.Array, resp_mask_BxN: jax.Array) -> DistillBatch:
    """A `DistillBatch` from a data batch (`prompt_ids`, `prompt_mask`, `ctx_prompt_ids`,
    `ctx_prompt_mask`) and a rollout; the response tokens carry no gradient."""
    return DistillBatch(
        prompt_ids_BxP=batch["prompt_ids"],
        prompt_mask_BxP=batch["prompt_mask"],
        ctx_prompt_ids_BxC=batch["ctx_prompt_ids"],
        ctx_prompt_mask_BxC=batch["ctx_prompt_mask"],
        resp_BxN=jax.lax.stop_gradient(resp_BxN),
        resp_mask_BxN=resp_mask_BxN,
    )


def append_response(prompt_ids_BxP, prompt_mask_BxP, resp_BxN, resp_mask_BxN):
    """`[prompt | response]` ids and mask, [B, P+N]; a response token t sits at slot P + t."""
    ids_BxL = jnp.concatenate([prompt_ids_BxP, resp_BxN.astype(prompt_ids_BxP.dtype)], axis=1)
    mask_BxL = jnp.concatenate([prompt_mask_BxP, resp_mask_BxN], axis=1)
    return ids_BxL, mask_BxL


def response_hiddens(
    model: Transformer, prompts: Sequence[tuple[jax.Array, jax.Array]], resp_BxN, resp_mask_BxN
) -> tuple[jax.Array, ...]:
    """For each prompt view (ids [B, P], mask [B, P]) followed by the response: the final-norm
    hidden states that predict each response token, slots P-1 ... P+N-2, [B, N, D]. The views run
    through the blocks together (`Transformer.forward_views`: one stacked gradient, not one per
    view)."""
    n = resp_BxN.shape[1]
    views = [append_response(ids, mask, resp_BxN, resp_mask_BxN) for ids, mask in prompts]
    hidden = model.forward_views(views)
    return tuple(
        jax.lax.dynamic_slice_in_dim(h_BxLxD, ids.shape[1] - 1, n, axis=1)
        for h_BxLxD, (ids, _) in zip(hidden, prompts, strict=True)
    )


def response_hidden(
    model: Transformer, prompt_ids_BxP, prompt_mask_BxP, resp_BxN, resp_mask_BxN
) -> jax.Array:
    """`response_hiddens` of one prompt view. [B, N, D]."""
    (h_BxNxD,) = response_hiddens(
        model, [(prompt_ids_BxP, prompt_mask_BxP)], resp_BxN, resp_mask_BxN
    )
    return h_BxNxD


def _token_terms(loss_cfg: LossConfig, with_consistency: bool) -> Callable:
    """Per-token (opd, consistency, reverse-KL diagnostic) [B, n] from the hidden states of one
    chunk of n response positions; the losses come from the registry by name."""
    opd_spec = losses.opd_loss(loss_cfg.opd)
    cons_spec = losses.consistency_loss(loss_cfg.consistency)
    options = dict(top_k=loss_cfg.top_k, jsd_beta=loss_cfg.jsd_beta)

    def terms(h_nc_BxNxD, h_c_BxNxD, h_t_BxNxD, unembed_s, unembed_t, tokens_BxN):
        s_nc_BxNxV = unembed_s.logits(h_nc_BxNxD)
        t_BxNxV = jax.lax.stop_gradient(unembed_t.logits(h_t_BxNxD))
        tokens_BxN = tokens_BxN if opd_spec.needs_tokens else None
        opd_BxN = opd_spec.fn(s_nc_BxNxV, t_BxNxV, tokens_BxN, **options)
        rkl_BxN = jax.lax.stop_gradient(losses.reverse_kl(s_nc_BxNxV, t_BxNxV))
        if not with_consistency:
            return opd_BxN, jnp.zeros_like(opd_BxN), rkl_BxN
        s_c_BxNxV = unembed_s.logits(h_c_BxNxD)
        # DualOPD pulls the with-context view to the teacher with the run's own divergence.
        cons_BxN = cons_spec.fn(
            s_nc_BxNxV, s_c_BxNxV, t_BxNxV, divergence=opd_spec.divergence, **options
        )
        return opd_BxN, cons_BxN, rkl_BxN

    return terms


def per_token_losses(
    loss_cfg: LossConfig,
    h_nc_BxNxD: jax.Array,
    h_c_BxNxD: jax.Array | None,
    h_t_BxNxD: jax.Array,
    unembed_s: Unembedding,
    unembed_t: Unembedding,
    tokens_BxN: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token (L_OPD, L_consistency, reverse KL) [B, N]; the consistency term is 0 when there
    is no with-context view (`h_c_BxNxD` None). With `chunk_size`, a rematerialized scan over
    response chunks keeps only one chunk's [B, chunk, V] logits alive in the forward and the
    backward pass."""
    terms = _token_terms(loss_cfg, with_consistency=h_c_BxNxD is not None)
    b, n = tokens_BxN.shape
    chunk = loss_cfg.chunk_size
    if not chunk or chunk >= n:
        return terms(h_nc_BxNxD, h_c_BxNxD, h_t_BxNxD, unembed_s, unembed_t, tokens_BxN)
    pad = -n % chunk

    def split(x_BxNx):  # [B, N, ...] -> [N/chunk, B, chunk, ...]
        x_BxNx = jnp.pad(x_BxNx, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxNx.ndim - 2))
        return jnp.moveaxis(x_BxNx.reshape(b, -1, chunk, *x_BxNx.shape[2:]), 1, 0)

    # Without a with-context view the scan still needs an array there; `terms` never reads it.
    h_c_BxNxD = h_nc_BxNxD if h_c_BxNxD is None else h_c_BxNxD
    body = jax.checkpoint(lambda carry, xs: (carry, terms(*xs[:3], unembed_s, unembed_t, xs[3])))
    xs = (split(h_nc_BxNxD), split(h_c_BxNxD), split(h_t_BxNxD), split(tokens_BxN))
    _, out = jax.lax.scan(body, None, xs)
    return tuple(jnp.moveaxis(o, 0, 1).reshape(b, -1)[:, :n] for o in out)


def teacher_targets(teacher_graphdef, teacher_params, batch: DistillBatch):
    """Step 2, the teacher on `[c | x | y]`: `(h_t_BxNxD, unembed_t)`, both constants (no gradient
    reaches the teacher). The loss projects them to logits chunk by chunk."""
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    h_t_BxNxD = jax.lax.stop_gradient(
        response_hidden(
            teacher,
            batch.ctx_prompt_ids_BxC,
            batch.ctx_prompt_mask_BxC,
            batch.resp_BxN,
            batch.resp_mask_BxN,
        )
    )
    return h_t_BxNxD, jax.lax.stop_gradient(teacher.unembedding())


def make_student_loss(graphdef, loss_cfg: LossConfig) -> Callable:
    """Steps 3-5 given the teacher's targets:
    `fn(params, batch, h_t_BxNxD, unembed_t, beta, count) -> (L, (sum L_OPD, sum L_cons, sum rkl))`.

    L is the per-token sum over response tokens divided by `count` (the whole batch's response-token
    count), so micro-batch losses add up to the full batch's masked mean. The with-context pass runs
    only when `loss_cfg.uses_consistency` (beta > 0 in the config).
    """
    with_consistency = loss_cfg.uses_consistency

    def student_loss(params, batch: DistillBatch, h_t_BxNxD, unembed_t, beta, count):
        model = nnx.merge(graphdef, params, copy=True)
        views = [(batch.prompt_ids_BxP, batch.prompt_mask_BxP)]
        if with_consistency:
            views.append((batch.ctx_prompt_ids_BxC, batch.ctx_prompt_mask_BxC))
        h_nc_BxNxD, *rest = response_hiddens(model, views, batch.resp_BxN, batch.resp_mask_BxN)
        h_c_BxNxD = rest[0] if with_consistency else None
        opd_BxN, cons_BxN, rkl_BxN = per_token_losses(
            loss_cfg,
            h_nc_BxNxD,
            h_c_BxNxD,
            h_t_BxNxD,
            model.unembedding(),
            unembed_t,
            batch.resp_BxN,
        )
        m_BxN = batch.resp_mask_BxN.astype(jnp.float32)
        opd_sum, cons_sum, rkl_sum = (
            (opd_BxN * m_BxN).sum(),
            (cons_BxN * m_BxN).sum(),
            (rkl_BxN * m_BxN).sum(),
        )
        loss = (opd_sum + (beta * cons_sum if with_consistency else 0.0)) / count
        return loss, (opd_sum, cons_sum, rkl_sum)

    return student_loss


def make_distill_loss(graphdef, teacher_graphdef, loss_cfg: LossConfig) -> Callable:
    """Steps 2-5 on fixed response tokens:
    `fn(params, teacher_params, batch, beta, count) -> (L, (sum L_OPD, sum L_cons, sum rkl))`,
    `teacher_targets` then `make_student_loss`'s function. The teacher is a constant."""
    student_loss = make_student_loss(graphdef, loss_cfg)

    def distill_loss(params, teacher_params, batch: DistillBatch, beta, count):
        h_t_BxNxD, unembed_t = teacher_targets(teacher_graphdef, teacher_params, batch)
        return student_loss(params, batch, h_t_BxNxD, unembed_t, beta, count)

    return distill_loss


# The retention anchor's random stream, folded out of the step's key: the rollout keeps the step
# key itself, so with the anchor off (or on) every existing stream is the same.
ANCHOR_STREAM = 0x7E7E


def draw_anchor_prompts(
    pool_ids_BxKxQ: jax.Array, pool_mask_BxKxQ: jax.Array, rng: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row, one of the K anchor-pool views `[c' | x]`, uniformly: `(ids_BxQ, mask_BxQ, k_B)`."""
    b, k = pool_ids_BxKxQ.shape[:2]
    k_B = jax.random.randint(rng, (b,), 0, k)

    def take(x_BxKxQ):
        return jnp.take_along_axis(x_BxKxQ, k_B[:, None, None], axis=1)[:, 0]

    return take(pool_ids_BxKxQ), take(pool_mask_BxKxQ), k_B


def anchor_batch(ids_BxQ, mask_BxQ, resp_BxN, resp_mask_BxN) -> DistillBatch:
    """The anchor's rollout as a `DistillBatch` whose both views are `[c' | x]`: the anchor model
    scores it through `teacher_targets`, the student through its no-context slot."""
    return DistillBatch(
        prompt_ids_BxP=ids_BxQ,
        prompt_mask_BxP=mask_BxQ,
        ctx_prompt_ids_BxC=ids_BxQ,
        ctx_prompt_mask_BxC=mask_BxQ,
        resp_BxN=jax.lax.stop_gradient(resp_BxN),
        resp_mask_BxN=resp_mask_BxN,
    )


def make_retention_loss(graphdef, anchor_graphdef, loss_cfg: LossConfig) -> Callable:
    """`fn(params, anchor_params, batch, count) -> (sum L_ret / count, sum L_ret)`: the registry's
    full-vocabulary reverse KL(student(. | c', x, y'<t) || anchor(. | c', x, y'<t)) summed over the
    response tokens of an `anchor_batch`. The anchor is a constant; `loss.chunk_size` applies."""
    rkl_cfg = dataclasses.replace(loss_cfg, opd="reverse_kl", beta=0.0)

    def retention_loss(params, anchor_params, batch: DistillBatch, count):
        h_a_BxNxD, unembed_a = teacher_targets(anchor_graphdef, anchor_params, batch)
        model = nnx.merge(graphdef, params, copy=True)
        h_s_BxNxD = response_hidden(
            model, batch.prompt_ids_BxP, batch.prompt_mask_BxP, batch.resp_BxN, batch.resp_mask_BxN
        )
        rkl_BxN, _, _ = per_token_losses(
            rkl_cfg, h_s_BxNxD, None, h_a_BxNxD, model.unembedding(), unembed_a, batch.resp_BxN
        )
        total = (rkl_BxN * batch.resp_mask_BxN.astype(jnp.float32)).sum()
        return total / count, total

    return retention_loss


def _accumulate(grad_fn: Callable, micro_batches: int, params, data: DistillBatch, *args):
    """`grad_fn(params, data, *args)` summed over `micro_batches` equal parts of `data`'s rows."""
    if micro_batches == 1:
        return grad_fn(params, data, *args)
    k = micro_batches
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), data)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda mb: grad_fn(params, mb, *args), first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def acc(carry, mb: DistillBatch):
        return jax.tree.map(jnp.add, carry, grad_fn(params, mb, *args)), None

    return jax.lax.scan(acc, zeros, micro)[0]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) parts of the step."""

    loss: LossConfig
    optim: OptimConfig
    rollout: RolloutConfig
    total_steps: int
    micro_batches: int
    eos_ids: tuple[int, ...]
    pad_id: int
    # gamma 0: no anchor, the step exactly as without it
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)


def _nonfinite(tree) -> jax.Array:
    """1.0 if any leaf of `tree` holds a NaN or inf, else 0.0 (a float: it logs like a metric)."""
    # x * 0 is 0 for every finite x and NaN for a NaN or an inf, so one sum per leaf says it in a
    # single fused pass; `isfinite(x).all()` wrote a boolean copy of every leaf and reduced that,
    # several times slower, and the step checks the whole model twice (gradients and parameters).
    zero = sum(jnp.sum(x * 0, dtype=jnp.float32) for x in jax.tree.leaves(tree))
    return 1.0 - jnp.isfinite(zero).astype(jnp.float32)


def _sampling_method(cfg: StepConfig) -> SamplingMethod:
    r = cfg.rollout
    return SamplingMethod(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)


def make_update_step(
    graphdef, teacher_graphdef, tx: optax.GradientTransformation, cfg: StepConfig
) -> Callable:
    """The train step after its rollout, un-jitted and pure: `update(state, teacher_params, batch,
    rollout, rng)` -> (next `TrainState`, metrics), where `rollout` is the student's `SampleOutput`
    on `batch`'s prompts. `make_train_step` is the rollout followed by this; a benchmark that times
    sampling apart calls it on a rollout it drew (one definition of the rest of the step)."""
    method = _sampling_method(cfg)
    distill_loss = make_distill_loss(graphdef, teacher_graphdef, cfg.loss)
    grad_fn = jax.value_and_grad(distill_loss, has_aux=True)
    retention_grad_fn = jax.value_and_grad(
        make_retention_loss(graphdef, teacher_graphdef, cfg.loss), has_aux=True
    )

    def retention_grads(student, params, teacher_params, batch: dict, rng: jax.Array):
        """The anchor: y' ~ student(. | c', x) for a c' drawn per row from the batch's pool, then
        the gradient of the retention loss (the anchor is the frozen teacher)."""
        draw_rng, sample_rng = jax.random.split(jax.random.fold_in(rng, ANCHOR_STREAM))
        ids_BxQ, mask_BxQ, _ = draw_anchor_prompts(
            batch["pool_prompt_ids"], batch["pool_prompt_mask"], draw_rng
        )
        rollout = sample(
            student,
            ids_BxQ,
            mask_BxQ,
            sample_rng,
            max_new_tokens=cfg.rollout.max_new_tokens,
            method=method,
            eos_ids=cfg.eos_ids,
            pad_id=cfg.pad_id,
        )
        data = anchor_batch(ids_BxQ, mask_BxQ, rollout.tokens_BxN, rollout.mask_BxN)
        count = jnp.maximum(rollout.mask_BxN.sum(), 1).astype(jnp.float32)

        def fn(p, mb, count):
            return retention_grad_fn(p, teacher_params, mb, count)

        (loss, _), grads = _accumulate(fn, cfg.micro_batches, params, data, count)
        return loss, grads, rollout

    def distill_grads(grad_fn, params, teacher_params, data: DistillBatch, beta, count):
        """`grad_fn`'s ((L, sums), gradient), summed over micro-batches: the count is the whole
        batch's, so the parts add up to the full batch's token-level mean."""

        def fn(p, mb, beta, count):
            return grad_fn(p, teacher_params, mb, beta, count)

        return _accumulate(fn, cfg.micro_batches, params, data, beta, count)

    # The adaptive start rule switches between two programs in-jit: plain OPD (no with-context
    # pass, as beta == 0 compiles it) until the rule fires, then OPD + the consistency term.
    adaptive = cfg.loss.beta_schedule == "adaptive" and cfg.loss.uses_consistency
    if adaptive:
        plain_grad_fn = jax.value_and_grad(
            make_distill_loss(graphdef, teacher_graphdef, dataclasses.replace(cfg.loss, beta=0.0)),
            has_aux=True,
        )

    def update(
        state: TrainState, teacher_params, batch: dict, rollout: SampleOutput, rng: jax.Array
    ):
        data = distill_batch(batch, rollout.tokens_BxN, rollout.mask_BxN)
        # Token-level mean over the whole batch, also when it is split into micro-batches.
        count = jnp.maximum(rollout.mask_BxN.sum(), 1).astype(jnp.float32)
        beta = beta_at(cfg.loss, state.step, state.beta_on)
        args = (state.params, teacher_params, data, beta, count)
        if adaptive:
            (loss, (opd_sum, cons_sum, rkl_sum)), grads = jax.lax.cond(
                state.beta_on > 0,
                lambda a: distill_grads(grad_fn, *a),
                lambda a: distill_grads(plain_grad_fn, *a),
                args,
            )
        else:
            (loss, (opd_sum, cons_sum, rkl_sum)), grads = distill_grads(grad_fn, *args)
        kl_ema, beta_on = start_rule(
            cfg.loss, state.step, state.kl_ema, state.beta_on, rkl_sum / count
        )

        extra = {}
        if cfg.retention.enabled:
            gamma = gamma_at(cfg.retention, state.step)
            l_ret, ret_grads, anchor = retention_grads(
                nnx.merge(graphdef, state.params), state.params, teacher_params, batch, rng
            )
            loss = loss + gamma * l_ret
            grads = jax.tree.map(lambda g, r: g + gamma * r, grads, ret_grads)
            extra = dict(
                l_retention=l_ret,
                gamma=gamma,
                anchor_response_len=anchor.lengths_B.astype(jnp.float32).mean(),
            )

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            loss=loss,
            l_opd=opd_sum / count,
            l_consistency=cons_sum / count,
            reverse_kl=rkl_sum / count,
            beta=beta,
            kl_ema=kl_ema,
            grad_norm=optax.tree.norm(grads),
            lr=lr_schedule(cfg.optim, cfg.total_steps)(state.step),
            response_len=rollout.lengths_B.astype(jnp.float32).mean(),
            response_tokens=rollout.mask_BxN.sum(),
            # Divergence flags (1.0 = some value is NaN/inf), reduced on device and fetched with the
            # other metrics one step late: the loop stops on them before anything is saved. All
            # three: a blow-up can leave the loss finite while gradients and update are NaN.
            nonfinite_loss=_nonfinite(loss),
            nonfinite_grads=_nonfinite(grads),
            nonfinite_params=_nonfinite(params),
            **extra,
        )
        next_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            kl_ema=kl_ema,
            beta_on=beta_on,
        )
        return next_state, metrics

    return update


def make_train_step(
    graphdef, teacher_graphdef, tx: optax.GradientTransformation, cfg: StepConfig
) -> Callable:
    """The un-jitted pure step; `jit_train_step` wraps it with donation and shardings."""
    method = _sampling_method(cfg)
    update = make_update_step(graphdef, teacher_graphdef, tx, cfg)

    def train_step(state: TrainState, teacher_params, batch: dict, rng: jax.Array):
        # 1. On-policy rollout without the context. Tokens are data: no gradient into sampling.
        rollout = sample(
            nnx.merge(graphdef, state.params),
            batch["prompt_ids"],
            batch["prompt_mask"],
            rng,
            max_new_tokens=cfg.rollout.max_new_tokens,
            method=method,
            eos_ids=cfg.eos_ids,
            pad_id=cfg.pad_id,
        )
        # 2-6. Teacher, student passes, loss, update (and the retention anchor when enabled).
        return update(state, teacher_params, batch, rollout, rng)

    return train_step


def jit_train_step(train_step: Callable, state_shardings=None) -> Callable:
    """One `jax.jit` over the whole step; the state is donated (updated in place on device)."""
    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0,))
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_shardings, None))
