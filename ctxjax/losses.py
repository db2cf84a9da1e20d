"""Distillation divergences and masked reductions.

Every divergence takes *logits* (not log-probs) of shape `[..., V]` (usually `[B, T, V]`; any
leading dims work), does all of its math in float32 whatever the input dtype, and returns the
per-token value of shape `[...]` (usually `[B, T]`) with no reduction, so the train step can
weight and combine them before one masked mean over response tokens (`masked_mean`).

Gradient conventions (the point of this module; each is tested):
- OPD divergences (`reverse_kl`, `reverse_kl_topk`, `forward_kl`, `generalized_jsd`,
  `sampled_token_pg`): the teacher is under `jax.lax.stop_gradient`; gradient reaches only the
  student.
- `nca`: the no-context student view is the stop-gradient anchor; gradient reaches only the
  with-context view.
- `dual_opd`: an OPD divergence from the with-context student view to the (stopped) teacher.
- `sym_kl`: no stop-gradient; gradient reaches both student views.

The train step picks its losses by name from one registry, `OPD_LOSSES` and `CONSISTENCY_LOSSES`
(name -> `LossSpec`: the per-token function and what it reads); the config accepts exactly those
names.

Zero-probability vocabulary entries (a `-inf` logit, e.g. padded vocabulary rows masked out) follow
`0 · log 0 = 0` and give finite values and gradients.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def _check_same_shape(a: jax.Array, b: jax.Array, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {a.shape} vs {b.shape}")


def masked_sum(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Sum of `x * mask` in float32; `mask` is bool or float weights (0 = padding, ignored).

    Masked-out entries are dropped with `where`, not multiplied by 0, so a NaN or inf sitting in a
    padded position (e.g. a divergence computed on garbage logits) cannot leak into the sum.
    """
    _check_same_shape(x_BxT, mask_BxT, "masked_sum(x, mask)")
    m = jnp.asarray(mask_BxT).astype(jnp.float32)
    return jnp.sum(jnp.where(m != 0, jnp.asarray(x_BxT).astype(jnp.float32) * m, 0.0))


def masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean of `x` over the positions where `mask` is non-zero (weighted by float masks), float32.

    The denominator is `max(mask.sum(), 1)`: an all-padding batch gives 0, not NaN. (With fractional
    weights summing below 1 the result is then the weighted sum, not a mean.)
    """
    count = jnp.maximum(jnp.asarray(mask_BxT).astype(jnp.float32).sum(), 1.0)
    return masked_sum(x_BxT, mask_BxT) / count


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


def _log_probs(logits_BxTxV: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)


def _kl_from_log_probs(logp_BxTxV: jax.Array, logq_BxTxV: jax.Array) -> jax.Array:
    """`KL(p || q) = Σ_v p (log p - log q)` over the last axis, with `0 · log 0 = 0`.

    Both `where`s are needed: the inner one keeps `-inf - (-inf) = nan` at zero-probability entries
    out of the forward value, and since the unselected branch then gets a zero cotangent (not
    `0 · nan`), out of the backward pass too.
    """
    p_BxTxV = jnp.exp(logp_BxTxV)
    support = p_BxTxV != 0  # not `> 0`: a NaN must stay NaN (it read 0.0 after a divergence)
    diff_BxTxV = jnp.where(support, logp_BxTxV - logq_BxTxV, 0.0)
    return jnp.sum(jnp.where(support, p_BxTxV * diff_BxTxV, 0.0), axis=-1)


def _teacher(teacher_logits_BxTxV: jax.Array) -> jax.Array:
    # The teacher is a fixed target: no gradient into its logits (or its parameters) from any loss.
    return jax.lax.stop_gradient(teacher_logits_BxTxV.astype(jnp.float32))


# --------------------------------------------------------------------------------------------------
# OPD divergences (student ‖ teacher); teacher always under stop_gradient
# --------------------------------------------------------------------------------------------------


def reverse_kl(student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array) -> jax.Array:
    """Per-token reverse KL over the full vocabulary: `Σ_v p_s (log p_s - log p_t)` → `[B, T]`.

    Mode-seeking; the standard on-policy distillation objective. Teacher under stop_gradient.
    """
    _check_same_shape(student_logits_BxTxV, teacher_logits_BxTxV, "reverse_kl(student, teacher)")
    return _kl_from_log_probs(
        _log_probs(student_logits_BxTxV), _log_probs(_teacher(teacher_logits_BxTxV))
    )


def reverse_kl_topk(
    student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array, k: int = 256
) -> jax.Array:
    """Per-token reverse KL restricted to the student's top-`k` tokens → `[B, T]`.

    At each position the `k` ids with the largest student logits are chosen (the choice itself
    carries no gradient), both distributions are renormalized over those ids (log-softmax of the
    gathered logits), and the reverse KL is taken over them. `k >= V` is clamped to the full
    vocabulary and returns `reverse_kl` exactly. `k` must be a static Python int. Teacher under
    stop_gradient.
    """
    _check_same_shape(
        student_logits_BxTxV, teacher_logits_BxTxV, "reverse_kl_topk(student, teacher)"
    )
    k = operator.index(k)
    if k <= 0:
        raise ValueError(f"reverse_kl_topk: k must be >= 1, got {k}")
    vocab = student_logits_BxTxV.shape[-1]
    if k >= vocab:
        return reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV)
    student_BxTxV = student_logits_BxTxV.astype(jnp.float32)
    _, ids_BxTxK = jax.lax.top_k(jax.lax.stop_gradient(student_BxTxV), k)
    student_BxTxK = jnp.take_along_axis(student_BxTxV, ids_BxTxK, axis=-1)
    teacher_BxTxK = jnp.take_along_axis(_teacher(teacher_logits_BxTxV), ids_BxTxK, axis=-1)
    return _kl_from_log_probs(_log_probs(student_BxTxK), _log_probs(teacher_BxTxK))


def forward_kl(student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array) -> jax.Array:
    """Per-token forward KL over the full vocabulary: `Σ_v p_t (log p_t - log p_s)` → `[B, T]`.

    Mode-covering (GKD's "supervised" direction). Teacher under stop_gradient.
    """
    _check_same_shape(student_logits_BxTxV, teacher_logits_BxTxV, "forward_kl(student, teacher)")
    return _kl_from_log_probs(
        _log_probs(_teacher(teacher_logits_BxTxV)), _log_probs(student_logits_BxTxV)
    )


def generalized_jsd(
    student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array, beta: float = 0.5
) -> jax.Array:
    """Per-token generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024) → `[B, T]`.

    `JSD(β) = β · KL(p_t ‖ m) + (1 - β) · KL(p_s ‖ m)` with `m = β p_t + (1 - β) p_s`; `log m` is
    computed stably as `logaddexp(log β + log p_t, log(1 - β) + log p_s)`. β = 0.5 is the usual
    (symmetric) JSD. Teacher under stop_gradient. `beta` must be a static Python number in [0, 1].

    Edge cases: the formula is identically 0 at β = 0 and at β = 1 (m equals one of the two
    distributions and that term's weight is 0). Instead we return the limits of the *scaled*
    divergence, as TRL's `GKDTrainer` and Liger-Kernel's JSD do: β = 0 returns `forward_kl`
    (`JSD(β)/β → KL(p_t ‖ p_s)` as β → 0) and β = 1 returns `reverse_kl`
    (`JSD(β)/(1 - β) → KL(p_s ‖ p_t)` as β → 1). So the value jumps at the endpoints by the factor
    β or 1 - β; a loss that is silently zero for a valid setting would be worse.
    """
    _check_same_shape(
        student_logits_BxTxV, teacher_logits_BxTxV, "generalized_jsd(student, teacher)"
    )
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits_BxTxV, teacher_logits_BxTxV)
    if beta == 1.0:
        return reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV)
    logp_s_BxTxV = _log_probs(student_logits_BxTxV)
    logp_t_BxTxV = _log_probs(_teacher(teacher_logits_BxTxV))
    # Where both log-probs are -inf (vocabulary both models mask), logaddexp's gradient is nan even
    # under a zero cotangent; feed it zeros there and put m = 0 back (those entries count 0 anyway).
    both_zero_BxTxV = jnp.isneginf(logp_t_BxTxV) & jnp.isneginf(logp_s_BxTxV)
    logm_BxTxV = jnp.logaddexp(
        jnp.log(beta) + jnp.where(both_zero_BxTxV, 0.0, logp_t_BxTxV),
        jnp.log1p(-beta) + jnp.where(both_zero_BxTxV, 0.0, logp_s_BxTxV),
    )
    logm_BxTxV = jnp.where(both_zero_BxTxV, -jnp.inf, logm_BxTxV)
    return beta * _kl_from_log_probs(logp_t_BxTxV, logm_BxTxV) + (1.0 - beta) * _kl_from_log_probs(
        logp_s_BxTxV, logm_BxTxV
    )


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    """`log softmax(logits)[token]` at each position, float32 → `[B, T]`.

    Gathers the one logit and subtracts the log-normalizer rather than materializing a full
    `[B, T, V]` log-softmax. Tokens must lie in `[0, V)`.
    """
    if logits_BxTxV.shape[:-1] != tokens_BxT.shape:
        raise ValueError(
            f"token_logprobs: logits {logits_BxTxV.shape} need tokens of shape "
            f"{logits_BxTxV.shape[:-1]}, got {tokens_BxT.shape}"
        )
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    picked_BxT = jnp.take_along_axis(
        logits_BxTxV, tokens_BxT[..., None].astype(jnp.int32), axis=-1
    )[..., 0]
    return picked_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)


def sampled_token_pg(
    student_token_logprob_BxT: jax.Array, teacher_token_logprob_BxT: jax.Array
) -> jax.Array:
    """Per-token sampled-token OPD surrogate in policy-gradient form → `[B, T]`.

    With `y_t` sampled from the student, the advantage is `A_t = -(log p_s(y_t) - log p_t(y_t))`
    (student log-prob and teacher under stop_gradient) and the surrogate is `-A_t · log p_s(y_t)`,
    whose gradient `-A_t ∇ log p_s(y_t)` is the single-sample estimate of the reverse-KL gradient.
    The *value* is a surrogate, not a KL: for logging use `student - teacher` token log-probs (the
    k1 estimate of reverse KL). Inputs come from `token_logprobs`.
    """
    _check_same_shape(
        student_token_logprob_BxT, teacher_token_logprob_BxT, "sampled_token_pg(student, teacher)"
    )
    logp_s_BxT = student_token_logprob_BxT.astype(jnp.float32)
    logp_t_BxT = jax.lax.stop_gradient(teacher_token_logprob_BxT.astype(jnp.float32))
    advantage_BxT = jax.lax.stop_gradient(-(logp_s_BxT - logp_t_BxT))
    return -advantage_BxT * logp_s_BxT


# --------------------------------------------------------------------------------------------------
# Consistency terms between the two student views (no-context x, with-context c,x)
# --------------------------------------------------------------------------------------------------


def nca(student_nc_logits_BxTxV: jax.Array, student_c_logits_BxTxV: jax.Array) -> jax.Array:
    """No-Context Anchoring: `KL(sg[p(·|x)] ‖ p(·|c,x))` per token → `[B, T]`.

    `Σ_v sg[p_nc] (log sg[p_nc] - log p_c)`: the no-context view is a stop-gradient anchor, so the
    gradient (`p_c - p_nc` w.r.t. the with-context logits) only keeps the with-context view from
    drifting away from what OPD teaches the no-context view; it never pulls the no-context view.
    """
    _check_same_shape(student_nc_logits_BxTxV, student_c_logits_BxTxV, "nca(student_nc, student_c)")
    anchor_BxTxV = jax.lax.stop_gradient(_log_probs(student_nc_logits_BxTxV))
    return _kl_from_log_probs(anchor_BxTxV, _log_probs(student_c_logits_BxTxV))


def dual_opd(
    student_c_logits_BxTxV: jax.Array,
    teacher_logits_BxTxV: jax.Array,
    kind: str = "reverse_kl",
    *,
    top_k: int = 256,
    jsd_beta: float = 0.5,
) -> jax.Array:
    """DualOPD ablation: the with-context student view pulled to the teacher → `[B, T]`.

    The OPD divergence `kind` (default reverse KL, `Σ_v p_c (log p_c - log p_t)`) with the
    with-context view in the student's place; teacher under stop_gradient.
    """
    return opd_divergence(
        kind, student_c_logits_BxTxV, teacher_logits_BxTxV, top_k=top_k, jsd_beta=jsd_beta
    )


def sym_kl(student_nc_logits_BxTxV: jax.Array, student_c_logits_BxTxV: jax.Array) -> jax.Array:
    """SymKL ablation: `KL(p_nc ‖ p_c) + KL(p_c ‖ p_nc)` per token → `[B, T]`.

    The sum (Jeffreys divergence), not the average, of the two directions, and no stop-gradient:
    both views are pulled toward each other.
    """
    _check_same_shape(
        student_nc_logits_BxTxV, student_c_logits_BxTxV, "sym_kl(student_nc, student_c)"
    )
    logp_nc_BxTxV = _log_probs(student_nc_logits_BxTxV)
    logp_c_BxTxV = _log_probs(student_c_logits_BxTxV)
    return _kl_from_log_probs(logp_nc_BxTxV, logp_c_BxTxV) + _kl_from_log_probs(
        logp_c_BxTxV, logp_nc_BxTxV
    )


# --------------------------------------------------------------------------------------------------
# The registry: config names -> per-token functions (the one place that knows the names)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A per-token loss of the train step, and what it reads.

    `fn` returns `[B, T]` float32. Its arguments depend on the registry:
    - `OPD_LOSSES`: `fn(student_logits_BxTxV, teacher_logits_BxTxV, tokens_BxT, *, top_k,
      jsd_beta)`;
    - `CONSISTENCY_LOSSES`: `fn(student_nc_logits_BxTxV, student_c_logits_BxTxV,
      teacher_logits_BxTxV, *, divergence, top_k, jsd_beta)`, where `divergence` names the
      full-vocabulary OPD divergence of the run (the `divergence` of its OPD spec).
    """

    fn: Callable[..., jax.Array]
    # Reads the sampled response tokens (their log-probs only); the others get `tokens_BxT=None`.
    needs_tokens: bool = False
    # Reads the teacher's logits (every OPD loss; of the consistency terms only DualOPD).
    needs_teacher: bool = True
    # OPD only: the full-vocabulary divergence this loss is, or estimates. DualOPD pulls the
    # with-context view to the teacher with it, since a per-token estimator on the no-context
    # view's samples says nothing about the with-context distribution.
    divergence: str | None = None


def _sampled_token(student_BxTxV, teacher_BxTxV, tokens_BxT, *, top_k, jsd_beta):
    return sampled_token_pg(
        token_logprobs(student_BxTxV, tokens_BxT), token_logprobs(teacher_BxTxV, tokens_BxT)
    )


def _dual_opd(nc_BxTxV, c_BxTxV, teacher_BxTxV, *, divergence, top_k, jsd_beta):
    return dual_opd(c_BxTxV, teacher_BxTxV, divergence, top_k=top_k, jsd_beta=jsd_beta)


OPD_LOSSES: dict[str, LossSpec] = {
    "reverse_kl": LossSpec(
        lambda s, t, y, *, top_k, jsd_beta: reverse_kl(s, t), divergence="reverse_kl"
    ),
    "reverse_kl_topk": LossSpec(
        lambda s, t, y, *, top_k, jsd_beta: reverse_kl_topk(s, t, k=top_k),
        divergence="reverse_kl_topk",
    ),
    "forward_kl": LossSpec(
        lambda s, t, y, *, top_k, jsd_beta: forward_kl(s, t), divergence="forward_kl"
    ),
    "jsd": LossSpec(
        lambda s, t, y, *, top_k, jsd_beta: generalized_jsd(s, t, beta=jsd_beta), divergence="jsd"
    ),
    # The policy-gradient estimator of the reverse KL's gradient, from the sampled tokens alone.
    "sampled_token": LossSpec(_sampled_token, needs_tokens=True, divergence="reverse_kl"),
}
CONSISTENCY_LOSSES: dict[str, LossSpec] = {
    "nca": LossSpec(lambda nc, c, t, **_: nca(nc, c), needs_teacher=False),
    "dual_opd": LossSpec(_dual_opd),
    "sym_kl": LossSpec(lambda nc, c, t, **_: sym_kl(nc, c), needs_teacher=False),
}


def _lookup(registry: dict[str, LossSpec], name: str, what: str) -> LossSpec:
    if name not in registry:
        raise ValueError(f"unknown {what} loss {name!r}; valid: {', '.join(registry)}")
    return registry[name]


def opd_loss(name: str) -> LossSpec:
    """The `OPD_LOSSES` entry `name`; an unknown name is an error listing the valid ones."""
    return _lookup(OPD_LOSSES, name, "OPD")


def consistency_loss(name: str) -> LossSpec:
    """The `CONSISTENCY_LOSSES` entry `name`; an unknown name is an error listing the valid ones."""
    return _lookup(CONSISTENCY_LOSSES, name, "consistency")


def opd_divergence(
    name: str,
    student_logits_BxTxV: jax.Array,
    teacher_logits_BxTxV: jax.Array,
    *,
    top_k: int = 256,
    jsd_beta: float = 0.5,
) -> jax.Array:
    """Per-token full-vocabulary OPD divergence by name → `[B, T]` (an `OPD_LOSSES` name whose
    spec does not need the sampled tokens)."""
    spec = opd_loss(name)
    if spec.needs_tokens:
        raise ValueError(f"OPD loss {name!r} needs the sampled tokens, not only two distributions")
    return spec.fn(student_logits_BxTxV, teacher_logits_BxTxV, None, top_k=top_k, jsd_beta=jsd_beta)
