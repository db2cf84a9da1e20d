"""The pure, jit-compiled OPD + NCA train step.

    train_step(state, teacher_params, batch, rng) -> (state, metrics)

1. sample      y ~ p_student(. | x)                 (no gradient: the tokens are data)
2. teacher     log p_teacher(. | c, x, y<t)         (stop_gradient)
3. student     log p_student(. | x, y<t)            (gradient from L_OPD)
4. student     log p_student(. | c, x, y<t)         (gradient from the consistency term; skipped
                                                     when beta == 0, which is then plain OPD exactly)
5. loss        L = L_OPD(3 || 2) + beta(step) * D(3, 4[, 2])   fp32, mean over response tokens
6. update      optax

The three passes see the same response tokens. `[x | y]` and `[c | x | y]` are built from left-padded
prompts with the response appended, and positions are `cumsum(mask) - 1`, so response token t sits at
RoPE position len(prompt) + t in its own view. Only response positions are projected to the
vocabulary, optionally in rematerialized chunks, so no `[B, L, V]` logits are ever materialized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from ctxjax import losses
from ctxjax.config import LossConfig, OptimConfig, RolloutConfig
from ctxjax.model import Transformer
from ctxjax.sampling import SamplingParams, sample


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of the student's nnx.Param variables
    opt_state: Any


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


def beta_at(cfg: LossConfig, step: jax.Array) -> jax.Array:
    """The consistency weight at `step`: constant, delayed (0 before the start), or a linear ramp."""
    step = jnp.asarray(step, jnp.float32)
    if cfg.beta_schedule == "constant":
        return jnp.asarray(cfg.beta, jnp.float32)
    if cfg.beta_schedule == "delayed":
        return jnp.where(step >= cfg.beta_start_step, cfg.beta, 0.0).astype(jnp.float32)
    frac = (step - cfg.beta_start_step + 1) / cfg.beta_ramp_steps
    return (cfg.beta * jnp.clip(frac, 0.0, 1.0)).astype(jnp.float32)


def init_state(model: Transformer, tx: optax.GradientTransformation) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
    )


def append_response(prompt_ids_BxP, prompt_mask_BxP, resp_BxN, resp_mask_BxN):
    """`[prompt | response]` ids and mask; a response token t sits at slot P + t."""
    ids = jnp.concatenate([prompt_ids_BxP, resp_BxN.astype(prompt_ids_BxP.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask_BxP, resp_mask_BxN], axis=1)
    return ids, mask


def response_hidden(
    model: Transformer, prompt_ids_BxP, prompt_mask_BxP, resp_BxN, resp_mask_BxN
) -> jax.Array:
    """Final-norm hidden states that predict each response token: slots P-1 ... P+N-2. [B, N, D]."""
    p, n = prompt_ids_BxP.shape[1], resp_BxN.shape[1]
    ids, mask = append_response(prompt_ids_BxP, prompt_mask_BxP, resp_BxN, resp_mask_BxN)
    hidden = model.forward(ids, mask_BxL=mask).hidden_BxLxD
    return jax.lax.dynamic_slice_in_dim(hidden, p - 1, n, axis=1)


def _token_terms(loss_cfg: LossConfig, with_consistency: bool):
    """Per-token (opd, consistency, reverse-KL diagnostic) from hidden states of one chunk."""

    def terms(h_nc, h_c, h_t, w_s, w_t, tokens):
        s_nc = jnp.einsum(
            "bnd,dv->bnv", h_nc, w_s.astype(h_nc.dtype), preferred_element_type=jnp.float32
        )
        t = jax.lax.stop_gradient(
            jnp.einsum(
                "bnd,dv->bnv", h_t, w_t.astype(h_t.dtype), preferred_element_type=jnp.float32
            )
        )
        if loss_cfg.opd == "sampled_token":
            opd = losses.sampled_token_pg(
                losses.token_logprobs(s_nc, tokens), losses.token_logprobs(t, tokens)
            )
        else:
            opd = losses.opd_divergence(
                loss_cfg.opd, s_nc, t, top_k=loss_cfg.top_k, jsd_beta=loss_cfg.jsd_beta
            )
        rkl = jax.lax.stop_gradient(losses.reverse_kl(s_nc, t))
        if with_consistency:
            s_c = jnp.einsum(
                "bnd,dv->bnv", h_c, w_s.astype(h_c.dtype), preferred_element_type=jnp.float32
            )
            # DualOPD pulls the with-context view to the teacher with the run's own divergence.
            cons = losses.consistency_divergence(
                loss_cfg.consistency,
                s_nc,
                s_c,
                t,
                top_k=loss_cfg.top_k,
                jsd_beta=loss_cfg.jsd_beta,
                opd_kind="reverse_kl" if loss_cfg.opd == "sampled_token" else loss_cfg.opd,
            )
        else:
            cons = jnp.zeros_like(opd)
        return opd, cons, rkl

    return terms


def per_token_losses(
    loss_cfg: LossConfig, with_consistency: bool, h_nc, h_c, h_t, w_s, w_t, tokens_BxN
):
    """[B, N] terms; with `chunk_size`, a rematerialized scan over response chunks keeps only one
    chunk's [B, chunk, V] logits alive in the forward and in the backward pass."""
    terms = _token_terms(loss_cfg, with_consistency)
    b, n = tokens_BxN.shape
    chunk = loss_cfg.chunk_size
    if not chunk or chunk >= n:
        return terms(h_nc, h_c, h_t, w_s, w_t, tokens_BxN)
    pad = -n % chunk

    def split(x):  # [B, N, ...] -> [C, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

    h_c = h_nc if h_c is None else h_c
    body = jax.checkpoint(lambda carry, xs: (carry, terms(*xs[:3], w_s, w_t, xs[3])))
    _, out = jax.lax.scan(body, None, (split(h_nc), split(h_c), split(h_t), split(tokens_BxN)))
    return tuple(jnp.moveaxis(o, 0, 1).reshape(b, -1)[:, :n] for o in out)


def distill_loss(
    params,
    data: dict,
    teacher_params,
    graphdef,
    teacher_graphdef,
    loss_cfg: LossConfig,
    beta: jax.Array,
    count: jax.Array,
):
    """Steps 2-5 on fixed response tokens: `(L, (sum L_OPD, sum L_cons, sum reverse-KL))`.

    `data` holds both prompts (`prompt_*` = [x], `ctx_prompt_*` = [c|x]), the response `resp` [B, N]
    and its `mask`. L is the per-token sum divided by `count` (the batch's response-token count), so
    micro-batch losses add up to the full batch's masked mean. The teacher is a constant.
    """
    with_consistency = loss_cfg.uses_consistency
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    h_t = jax.lax.stop_gradient(
        response_hidden(
            teacher, data["ctx_prompt_ids"], data["ctx_prompt_mask"], data["resp"], data["mask"]
        )
    )
    w_t = jax.lax.stop_gradient(teacher.unembed_matrix())
    model = nnx.merge(graphdef, params, copy=True)
    h_nc = response_hidden(
        model, data["prompt_ids"], data["prompt_mask"], data["resp"], data["mask"]
    )
    h_c = (
        response_hidden(
            model, data["ctx_prompt_ids"], data["ctx_prompt_mask"], data["resp"], data["mask"]
        )
        if with_consistency
        else None
    )
    opd, cons, rkl = per_token_losses(
        loss_cfg, with_consistency, h_nc, h_c, h_t, model.unembed_matrix(), w_t, data["resp"]
    )
    m = data["mask"].astype(jnp.float32)
    opd_sum, cons_sum, rkl_sum = (opd * m).sum(), (cons * m).sum(), (rkl * m).sum()
    loss = (opd_sum + (beta * cons_sum if with_consistency else 0.0)) / count
    return loss, (opd_sum, cons_sum, rkl_sum)


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


def _nonfinite(tree) -> jax.Array:
    """1.0 if any leaf of `tree` holds a NaN or inf, else 0.0 (a float: it logs like a metric)."""
    finite = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]
    return 1.0 - jnp.stack(finite).all().astype(jnp.float32)


def make_train_step(
    graphdef, teacher_graphdef, tx: optax.GradientTransformation, cfg: StepConfig
) -> Callable:
    """The un-jitted pure step; `jit_train_step` wraps it with donation and shardings."""
    sampling = SamplingParams(
        temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p
    )

    def train_step(state: TrainState, teacher_params, batch: dict, rng: jax.Array):
        student = nnx.merge(graphdef, state.params)
        # 1. On-policy rollout without the context. Tokens are data: no gradient flows into sampling.
        rollout = sample(
            student,
            batch["prompt_ids"],
            batch["prompt_mask"],
            rng,
            max_new_tokens=cfg.rollout.max_new_tokens,
            params=sampling,
            eos_ids=cfg.eos_ids,
            pad_id=cfg.pad_id,
        )
        data = dict(
            prompt_ids=batch["prompt_ids"],
            prompt_mask=batch["prompt_mask"],
            ctx_prompt_ids=batch["ctx_prompt_ids"],
            ctx_prompt_mask=batch["ctx_prompt_mask"],
            resp=jax.lax.stop_gradient(rollout.tokens_BxN),
            mask=rollout.mask_BxN,
        )
        # Token-level mean over the whole batch, also when it is split into micro-batches.
        count = jnp.maximum(rollout.mask_BxN.sum(), 1).astype(jnp.float32)
        beta = beta_at(cfg.loss, state.step)
        grad_fn = jax.value_and_grad(distill_loss, has_aux=True)
        args = (teacher_params, graphdef, teacher_graphdef, cfg.loss, beta, count)
        if cfg.micro_batches == 1:
            (loss, (opd_sum, cons_sum, rkl_sum)), grads = grad_fn(state.params, data, *args)
        else:  # gradient accumulation over micro-batches, one rematerialized pass set at a time
            k = cfg.micro_batches
            micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), data)

            def acc(carry, mb):
                (l, aux), g = grad_fn(state.params, mb, *args)
                return jax.tree.map(jnp.add, carry, (l, aux, g)), None

            zeros = (
                jnp.zeros(()),
                (jnp.zeros(()),) * 3,
                jax.tree.map(jnp.zeros_like, state.params),
            )
            (loss, (opd_sum, cons_sum, rkl_sum), grads), _ = jax.lax.scan(acc, zeros, micro)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(
            loss=loss,
            l_opd=opd_sum / count,
            l_consistency=cons_sum / count,
            reverse_kl=rkl_sum / count,
            beta=beta,
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
        )
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step: Callable, state_shardings=None) -> Callable:
    """One `jax.jit` over the whole step; the state is donated (updated in place on device)."""
    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=(0,))
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(state_shardings, None))
