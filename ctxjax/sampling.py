"""Autoregressive sampling: a KV-cache prefill, then a `lax.while_loop` decode, one token a step.

Two entry points:
- `sample`: the pure, jittable core. The train step calls it inside its own `jax.jit` with a model
  from `nnx.merge(graphdef, state)`; every shape is static (`max_new_tokens`, the prompt width).
- `generate`: the user-facing wrapper over Python lists. It pads prompt width, token budget and
  batch size up to buckets and calls one jitted function cached per (bucket shapes,
  `SamplingMethod`, `eos_ids`, `pad_id`), so an evaluation run compiles a handful of times, not once
  per batch.

Slots and positions follow `ctxjax.model`: prompts are left-padded, so the last prompt slot holds
every row's last real token and generated token `j` of a row sits at slot `P + j` with RoPE
position `n_prompt + j` (`n_prompt` = the row's real-token count), whatever padding the row got.

Log-probabilities are those of the model's *unprocessed* distribution, `log_softmax(raw logits)` at
the chosen token, i.e. what a full forward pass over `[prompt | response]` gives at the response
positions (tested). Temperature, top-k and top-p only change which token is drawn, never the
reported log-prob. Sampling is not differentiable: the model state is read under `stop_gradient`,
so a loss must recompute log-probs with its own forward pass over the sampled tokens (which are
constants).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ctxjax.model import Transformer, cast_for_compute
from ctxjax.padding import bucket_batch, bucket_length, pad_left_rows


@dataclasses.dataclass(frozen=True)
class SamplingMethod:
    """How the next token is chosen from the logits. Hashable, so it can be a static jit argument.

    The logits are processed in one fixed order: temperature, then top-k, then top-p
    (`process_logits`). `temperature == 0` means greedy decoding: the argmax of the raw logits,
    which top-k and top-p cannot change (the argmax is always kept), so they are moot then.
    """

    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # keep the k largest logits (None = all)
    top_p: float | None = None  # nucleus: keep the smallest set of mass >= top_p (None = all)

    def __post_init__(self):
        if not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def process_logits(self, logits_BxV: jax.Array) -> jax.Array:
        """Float32 logits to sample from: divided by the temperature, then filtered (-> -inf).

        - temperature: `logits / T` (skipped for T = 0, where only the argmax matters).
        - top-k: keeps every logit >= the k-th largest. Ties with the k-th value are all kept, so
          more than k tokens survive when the boundary is tied.
        - top-p: on the distribution renormalized after top-k, sorts the probabilities in
          decreasing order and keeps the smallest prefix whose mass is >= top_p (a token is kept
          when the mass *before* it is < top_p, so the most likely token always survives). Tokens
          tied with the last kept one are kept as well.
        """
        x_BxV = logits_BxV.astype(jnp.float32)
        if self.temperature > 0:
            x_BxV = x_BxV / self.temperature
        vocab = x_BxV.shape[-1]
        sorted_BxK = None  # the largest values in decreasing order, when already computed
        if self.top_k is not None and self.top_k < vocab:
            sorted_BxK, _ = jax.lax.top_k(x_BxV, self.top_k)
            x_BxV = jnp.where(x_BxV >= sorted_BxK[:, -1:], x_BxV, -jnp.inf)
        if self.top_p is not None and self.top_p < 1.0:
            if sorted_BxK is None:
                sorted_BxK = -jnp.sort(-x_BxV, axis=-1)
            # The normalizer comes from all surviving logits (ties beyond k included), not only the
            # k sorted values.
            log_norm_Bx1 = jax.nn.logsumexp(x_BxV, axis=-1, keepdims=True)
            probs_BxK = jnp.exp(sorted_BxK - log_norm_Bx1)
            mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
            # >= 1 kept: the first mass_before is 0.
            num_kept_B = jnp.sum(mass_before_BxK < self.top_p, axis=-1)
            threshold_Bx1 = jnp.take_along_axis(sorted_BxK, num_kept_B[:, None] - 1, axis=-1)
            x_BxV = jnp.where(x_BxV >= threshold_Bx1, x_BxV, -jnp.inf)
        return x_BxV

    def next_tokens(self, logits_BxV: jax.Array, rng: jax.Array) -> jax.Array:
        """Int32 token ids [B]: the argmax when greedy, else a draw from `process_logits`."""
        if self.greedy:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return jax.random.categorical(rng, self.process_logits(logits_BxV), axis=-1).astype(
            jnp.int32
        )


@struct.dataclass
class SampleOutput:
    """Generated responses, right-padded.

    tokens_BxN: int32; `pad_id` after the first EOS and wherever decoding stopped early.
    logprobs_BxN: float32 log-prob of each token under the model's unprocessed distribution
      (log_softmax of the raw logits, the same as a full forward pass gives); 0 where the mask is
      False.
    mask_BxN: bool; True up to and including the first EOS (all True when no EOS within the budget).
    lengths_B: int32; the number of True entries of each mask row.
    """

    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    mask_BxN: jax.Array
    lengths_B: jax.Array


@struct.dataclass
class _DecodeState:
    step: jax.Array  # int32 scalar: index of the token this iteration produces
    cache: object  # ctxjax.model.KVCache
    last_B: jax.Array  # int32: the token produced by the previous iteration (fed in this one)
    done_B: jax.Array  # bool: the row has emitted an EOS (or is batch padding)
    lengths_B: jax.Array  # int32: tokens emitted so far, up to and including the first EOS
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array


def _pick(
    method: SamplingMethod,
    logits_BxV: jax.Array,
    rng: jax.Array,
    done_B: jax.Array,
    eos_ids: tuple[int, ...],
    pad_id: int,
):
    """Chooses the next tokens and their raw log-probs; finished rows get `pad_id` and 0."""
    tokens_B = method.next_tokens(logits_BxV, rng)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    logprob_B = jnp.take_along_axis(logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
    tokens_B = jnp.where(done_B, pad_id, tokens_B)
    logprob_B = jnp.where(done_B, 0.0, logprob_B)
    if not eos_ids:
        return tokens_B, logprob_B, done_B
    return tokens_B, logprob_B, done_B | jnp.isin(tokens_B, jnp.asarray(eos_ids, jnp.int32))


def _write_column(x_BxN: jax.Array, col_B: jax.Array, step: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(x_BxN, col_B[:, None].astype(x_BxN.dtype), (0, step))


def _prefill(
    model: Transformer,
    prompt_ids_BxP: jax.Array,
    mask_BxP: jax.Array,
    budget: jax.Array,
    active_B: jax.Array,
    n: int,
    pick: Callable,
    pad_id: int,
) -> _DecodeState:
    """The decode loop's first state: every prompt slot run at once into a cache of P + n slots,
    and the first token drawn from the last slot's logits."""
    b, p = prompt_ids_BxP.shape
    # Positions from the mask (cumsum - 1). Left padding puts every row's last real token at slot
    # P - 1, the only slot whose logits are needed.
    cache = model.init_cache(b, p + n)
    # Padding slots are fed token 0, not `pad_id`: an id >= vocab_size embeds as NaN (out-of-bounds
    # gathers fill with NaN), and a NaN value in a masked slot still poisons attention (0 * NaN).
    ids_BxP = jnp.where(mask_BxP, prompt_ids_BxP.astype(jnp.int32), 0)
    out = model.forward(ids_BxP, mask_BxL=mask_BxP, cache=cache)
    logits_BxV = model.logits(out.hidden_BxLxD[:, -1])
    done_B = ~active_B.astype(bool) | (budget <= 0)
    first_B, logprob_B, done_after_B = pick(logits_BxV, 0, done_B)
    tokens_BxN = _write_column(jnp.full((b, n), pad_id, jnp.int32), first_B, 0)
    logprobs_BxN = _write_column(jnp.zeros((b, n), jnp.float32), logprob_B, 0)
    return _DecodeState(
        step=jnp.ones((), jnp.int32),
        cache=out.cache,
        last_B=first_B,
        done_B=done_after_B,
        lengths_B=(~done_B).astype(jnp.int32),
        tokens_BxN=tokens_BxN,
        logprobs_BxN=logprobs_BxN,
    )


def _decode_step(
    model: Transformer, s: _DecodeState, n_prompt_B: jax.Array, pick: Callable
) -> _DecodeState:
    """One turn of the decode loop: feed each row's last token, draw the next."""
    # The token fed now was produced at step - 1, so it is the row's (n_prompt + step - 1)-th
    # token.
    positions_Bx1 = (n_prompt_B + s.step - 1)[:, None]
    # Finished rows feed `pad_id`, clipped into the vocabulary for the same reason as the prefill.
    fwd = model.forward(
        jnp.clip(s.last_B, 0, model.cfg.vocab_size - 1)[:, None],
        positions_BxL=positions_Bx1,
        cache=s.cache,
    )
    logits_BxV = model.logits(fwd.hidden_BxLxD[:, 0])
    tok_B, lp_B, done_B = pick(logits_BxV, s.step, s.done_B)
    return _DecodeState(
        step=s.step + 1,
        cache=fwd.cache,
        last_B=tok_B,
        done_B=done_B,
        lengths_B=s.lengths_B + (~s.done_B).astype(jnp.int32),
        tokens_BxN=_write_column(s.tokens_BxN, tok_B, s.step),
        logprobs_BxN=_write_column(s.logprobs_BxN, lp_B, s.step),
    )


def _sample(
    model: Transformer,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    rng: jax.Array,
    budget: jax.Array,
    active_B: jax.Array,
    *,
    max_new_tokens: int,
    method: SamplingMethod,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> SampleOutput:
    """`sample` with a traced token budget (<= max_new_tokens) and rows that start finished.

    `budget` lets `generate` compile one loop for a whole budget bucket: the while condition stops
    at the real budget, the static `max_new_tokens` only sizes the buffers. Rows with `active_B`
    False (batch padding) emit nothing and never keep the loop running.
    """
    n = max_new_tokens
    graphdef, state = nnx.split(model)
    # Sampling is not differentiable (integer draws, a while loop); stopping the gradient here also
    # lets `sample` sit inside a differentiated function without reverse-mode through the loop.
    state = jax.lax.stop_gradient(state)
    # Weights in the compute dtype once, outside the loop: each decode step reads them whole.
    state = cast_for_compute(state, model.numerics)
    model = nnx.merge(graphdef, state)
    mask_BxP = prompt_mask_BxP.astype(bool)
    n_prompt_B = jnp.sum(mask_BxP, axis=-1).astype(jnp.int32)

    def pick(logits_BxV, step, done_B):
        """The next token of each row, drawn with step `step`'s key."""
        key = jax.random.fold_in(rng, step)
        return _pick(method, logits_BxV, key, done_B, eos_ids, pad_id)

    state0 = _prefill(model, prompt_ids_BxP, mask_BxP, budget, active_B, n, pick, pad_id)

    def cond(s: _DecodeState):
        return (s.step < jnp.minimum(budget, n)) & ~jnp.all(s.done_B)

    def body(s: _DecodeState) -> _DecodeState:
        return _decode_step(nnx.merge(graphdef, state), s, n_prompt_B, pick)

    final = jax.lax.while_loop(cond, body, state0)
    mask_BxN = jnp.arange(n)[None, :] < final.lengths_B[:, None]
    return SampleOutput(
        tokens_BxN=final.tokens_BxN,
        logprobs_BxN=final.logprobs_BxN,
        mask_BxN=mask_BxN,
        lengths_B=final.lengths_B,
    )


def sample(
    model: Transformer,
    prompt_ids_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    method: SamplingMethod,
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> SampleOutput:
    """Samples up to `max_new_tokens` tokens after left-padded prompts; pure and jittable.

    Args:
      model: the decoder (may be `nnx.merge`d inside the caller's `jax.jit`).
      prompt_ids_BxP / prompt_mask_BxP: left-padded prompts; every row needs >= 1 real token.
      rng: a PRNG key (unused when greedy). Step t draws with `fold_in(rng, t)`.
      max_new_tokens: static budget N; the KV cache has P + N slots.
      method: how each token is chosen: temperature / top-k / top-p (static).
      eos_ids: tokens that end a row (static; empty = run the full budget).
      pad_id: written after a row's first EOS; any int (it is never fed to the model, so an id
        outside the vocabulary is fine).

    The decode loop stops as soon as every row has emitted an EOS. Returns `SampleOutput` of [B, N].
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    b = prompt_ids_BxP.shape[0]
    return _sample(
        model,
        prompt_ids_BxP,
        prompt_mask_BxP,
        rng,
        jnp.asarray(max_new_tokens, jnp.int32),
        jnp.ones((b,), bool),
        max_new_tokens=max_new_tokens,
        method=method,
        eos_ids=tuple(int(e) for e in eos_ids),
        pad_id=int(pad_id),
    )


# --------------------------------------------------------------------------------------------------
# User-facing wrapper: bucketed shapes, one cached compile per bucket
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "method", "eos_ids", "pad_id"))
def _generate_jit(
    model,
    prompt_ids_BxP,
    prompt_mask_BxP,
    rng,
    budget,
    active_B,
    *,
    max_new_tokens,
    method,
    eos_ids,
    pad_id,
):
    # The model goes in as a pytree (NNX modules are ones): its weights are traced leaves, so new
    # weights or another instance of the same architecture reuse the compiled loop, and jax flattens
    # it in C++, far faster than `nnx.split` on every call.
    return _sample(
        model,
        prompt_ids_BxP,
        prompt_mask_BxP,
        rng,
        budget,
        active_B,
        max_new_tokens=max_new_tokens,
        method=method,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )


def _check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not prompts:
        raise ValueError("generate: prompts is empty")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {i} is empty (every prompt needs >= 1 token)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")


def _check_token_ids(prompts: Sequence[Sequence[int]], vocab: int) -> None:
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
) -> SampleOutput:
    """Samples continuations of token-id prompts of any lengths; numpy arrays [len(prompts), N].

    Shapes are bucketed so that a run compiles a few times, not per batch: prompts are left-padded
    to the next power of two >= the longest (min 8), the batch to `bucket_batch`, and the budget to
    the next power of two >= `max_new_tokens` (min 8). The real budget is passed to the loop as a
    traced value, so the loop stops at `max_new_tokens` exactly (bucketing never changes the
    result); the outputs are trimmed to `max_new_tokens` columns and the real rows. With greedy
    decoding a row's tokens do not depend on the other rows or the buckets; with sampling the draws
    depend on `seed` and the bucketed batch size.
    """
    _check_prompts(prompts, max_new_tokens)
    method = SamplingMethod(temperature=temperature, top_k=top_k, top_p=top_p)
    _check_token_ids(prompts, model.cfg.vocab_size)
    rows = len(prompts)
    width = bucket_length(max(len(p) for p in prompts))
    ids_BxP, mask_BxP = pad_left_rows(prompts, width, bucket_batch(rows), pad_id)
    # Filler rows start finished.
    active_B = np.arange(ids_BxP.shape[0]) < rows
    out = _generate_jit(
        model,
        ids_BxP,
        mask_BxP,
        jax.random.key(seed),
        np.int32(max_new_tokens),
        active_B,
        max_new_tokens=bucket_length(max_new_tokens),
        method=method,
        eos_ids=tuple(int(e) for e in eos_ids),
        pad_id=int(pad_id),
    )
    out = jax.device_get(out)

    def trim(x):
        return np.asarray(x)[:rows, :max_new_tokens]

    return SampleOutput(
        tokens_BxN=trim(out.tokens_BxN),
        logprobs_BxN=trim(out.logprobs_BxN),
        mask_BxN=trim(out.mask_BxN),
        lengths_B=np.asarray(out.lengths_B)[:rows],
    )
