"""Decoder-only transformer for the Llama, Qwen2 and Qwen3 families, in Flax NNX.

One module tree covers the three families through config flags: RMSNorm, rotary embeddings (RoPE),
grouped-query attention, SwiGLU MLP, optional q/k/v bias (Qwen2), optional per-head q/k RMSNorm
(Qwen3), tied or untied embeddings. Parameter names mirror the HF checkpoints (`embed_tokens`,
`layers[i].self_attn.q_proj`, ...) so `ctxjax.hf` maps them one to one.

Shape suffixes: B batch, L query length, S key length (cache slots), D model width, H query heads,
K key/value heads, G = H // K query heads per kv head, Dh head width, F MLP width, V vocabulary.

Slots and positions. Every token lives in a *slot* (its index in the padded sequence or in the KV
cache) and has a RoPE *position* (its index among the row's real tokens, `cumsum(mask) - 1`). A
query attends to keys whose slot is not after its own and whose mask bit is set. Left padding
therefore changes slots but not positions, so a row's logits do not depend on how much padding it
got.

Architecture and numerics are separate: `ModelConfig` is what a checkpoint's config.json fixes,
`Numerics` is how this process runs it. Dtype policy: parameters in `param_dtype`, matmuls in
`compute_dtype`; RMSNorm statistics, softmax and the logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

FAMILIES = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder, what a checkpoint fixes. Field names follow HF's."""

    family: str = "llama"  # HF model_type written on export: "llama" | "qwen2" | "qwen3"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads (Qwen3 sets it explicitly)
    rope_theta: float = 10000.0
    # HF `rope_scaling` / `rope_parameters` beyond theta: None or ("llama3", factor,
    # low_freq_factor, high_freq_factor, original_max_position_embeddings).
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama with attention_bias=True; Qwen3 with attention_bias=True
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: True
    max_position_embeddings: int = 4096

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be a multiple of "
                f"model.num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads}) unless model.head_dim is set"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head dim must be even for RoPE, got {self.resolved_head_dim}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count, from the abstract model (no memory allocated)."""
        abstract = nnx.eval_shape(lambda: Transformer(self, rngs=nnx.Rngs(0)))
        return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a model runs, whatever its architecture: not part of a checkpoint's config.json."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False  # rematerialize each block in the backward pass (per-layer activations)
    # Run the blocks as one `lax.scan` over parameters stacked on a leading layer axis, so the
    # compiled program holds one block whatever the depth (compile time flat in num_layers). The
    # parameters then live stacked (`layers.mlp.up_proj.kernel` is [num_layers, D, F]); HF folders
    # keep per-layer tensors either way (`unrolled_params` / `fill_unrolled`). Opt-in: it shortens
    # a deep model's first step, but a scanned fwd+bwd runs slower per call (no cross-layer fusion
    # or scheduling) and a shallow model compiles no faster.
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"numerics.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}"
                )

    @property
    def params(self) -> Any:
        return DTYPES[self.param_dtype]

    @property
    def compute(self) -> Any:
        return DTYPES[self.compute_dtype]


DEFAULT_NUMERICS = Numerics()  # float32 throughout, no rematerialization


@struct.dataclass
class KVCache:
    """Per-layer keys and values by slot, which slots hold a real token, and the next free slot.

    Left-padded batches share slot numbers across rows, so one scalar `index` serves the batch.
    """

    # Slots on the third axis, [B, K, S, Dh]: the attention einsums read it without a transpose,
    # whereas [B, S, K, Dh] made XLA copy every layer's whole cache at every decode step.
    # num_layers x [B, K, S, Dh]; one stacked [num_layers, B, K, S, Dh] array when the layers scan.
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    mask_BxS: jax.Array  # bool: slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: first slot not yet written

    @property
    def max_len(self) -> int:
        return self.mask_BxS.shape[1]


def init_cache(
    cfg: ModelConfig, batch: int, max_len: int, dtype: str = "float32", *, stacked: bool = False
) -> KVCache:
    """An empty cache of `max_len` slots in `dtype` (a DTYPES name: the model's compute dtype),
    per layer or `stacked` (what a `scan_layers` model reads); `Transformer.init_cache` picks
    both for a model."""
    dtype = DTYPES[dtype]
    shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    if stacked:
        zeros = jnp.zeros((cfg.num_layers, *shape), dtype)
    else:
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(
        k=zeros, v=zeros, mask_BxS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32)
    )


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
    """RoPE positions of left- (or right-) padded rows: how many real tokens precede each slot."""
    return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [Dh/2], with Llama 3's long-context rescaling when configured."""
    dh = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    if cfg.rope_scaling is None:
        return inv_freq
    kind, factor, low_ff, high_ff, orig_max = cfg.rope_scaling
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; supported: 'llama3'")
    # Same piecewise rule as HF's `_compute_llama3_parameters`: long wavelengths are divided by
    # `factor`, short ones kept, the band between interpolated smoothly.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig_max / low_ff, orig_max / high_ff
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig_max / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxLxNxDh: jax.Array, positions_BxL: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates the two halves of each head (HF's `rotate_half` layout), in float32."""
    angles_BxLxHalf = positions_BxL[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BxLxHalf)[:, :, None, :]
    sin = jnp.sin(angles_BxLxHalf)[:, :, None, :]
    x = x_BxLxNxDh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxDh.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


def _linear(din: int, dout: int, bias: bool, num: Numerics, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=num.compute,
        param_dtype=num.params,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


def _dense(layer: nnx.Linear, x_BxLxDin: jax.Array) -> jax.Array:
    """`layer` applied to the rows of a 2-D [B*L, Din] view. On a 3-D input the backward's weight
    gradient contracts two axes (B and L), which XLA CPU lowered as a transposed copy of the
    activations before each dot; with one row axis the dot reads them in place (bitwise-equal
    results, less CPU time)."""
    *lead, din = x_BxLxDin.shape
    return layer(x_BxLxDin.reshape(-1, din)).reshape(*lead, -1)


def _attend(q_BxLxHxDh, keys_BxKxSxDh, values_BxKxSxDh, allowed_BxLxS) -> jax.Array:
    """Grouped-query softmax attention of each query over the keys it is `allowed`: [B, L, H, Dh].
    Scores and softmax in float32."""
    b, seq_len, h, dh = q_BxLxHxDh.shape
    k = keys_BxKxSxDh.shape[1]
    g = h // k
    q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, seq_len, k, g, dh)
    scores_BxKxGxLxS = jnp.einsum(
        "blkgd,bksd->bkgls",
        q_BxLxKxGxDh,
        keys_BxKxSxDh.astype(q_BxLxKxGxDh.dtype),
        preferred_element_type=jnp.float32,
    ) / math.sqrt(dh)
    # A finite floor instead of -inf: padding queries see no key at all and must stay NaN-free.
    scores_BxKxGxLxS = jnp.where(allowed_BxLxS[:, None, None], scores_BxKxGxLxS, -1e30)
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1)
    out_BxLxKxGxDh = jnp.einsum(
        "bkgls,bksd->blkgd", probs_BxKxGxLxS.astype(values_BxKxSxDh.dtype), values_BxKxSxDh
    )
    return out_BxLxKxGxDh.reshape(b, seq_len, h, dh)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, num: Numerics, rngs: nnx.Rngs):
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        self.q_proj = _linear(d, h * dh, cfg.qkv_bias, num, rngs)
        self.k_proj = _linear(d, k * dh, cfg.qkv_bias, num, rngs)
        self.v_proj = _linear(d, k * dh, cfg.qkv_bias, num, rngs)
        self.o_proj = _linear(h * dh, d, cfg.o_bias, num, rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, num.params)
            self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, num.params)
        self.cfg = cfg

    def __call__(self, x_BxLxD, positions_BxL, inv_freq, keys_mask_BxS, query_slots_L, cache_kv):
        cfg = self.cfg
        b, seq_len, _ = x_BxLxD.shape
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        q_BxLxHxDh = _dense(self.q_proj, x_BxLxD).reshape(b, seq_len, h, dh)
        k_BxLxKxDh = _dense(self.k_proj, x_BxLxD).reshape(b, seq_len, k, dh)
        v_BxLxKxDh = _dense(self.v_proj, x_BxLxD).reshape(b, seq_len, k, dh)
        if cfg.qk_norm:
            q_BxLxHxDh, k_BxLxKxDh = self.q_norm(q_BxLxHxDh), self.k_norm(k_BxLxKxDh)
        q_BxLxHxDh = apply_rope(q_BxLxHxDh, positions_BxL, inv_freq)
        k_BxLxKxDh = apply_rope(k_BxLxKxDh, positions_BxL, inv_freq)

        if cache_kv is None:  # keys are exactly this call's tokens
            keys_BxKxSxDh = k_BxLxKxDh.transpose(0, 2, 1, 3)
            values_BxKxSxDh = v_BxLxKxDh.transpose(0, 2, 1, 3)
            new_kv = None
        else:  # write this call's tokens at slots [index, index + L), attend over the whole cache
            cache_k, cache_v, index = cache_kv
            start = (0, 0, index, 0)
            keys_BxKxSxDh = jax.lax.dynamic_update_slice(
                cache_k, k_BxLxKxDh.transpose(0, 2, 1, 3).astype(cache_k.dtype), start
            )
            values_BxKxSxDh = jax.lax.dynamic_update_slice(
                cache_v, v_BxLxKxDh.transpose(0, 2, 1, 3).astype(cache_v.dtype), start
            )
            new_kv = (keys_BxKxSxDh, values_BxKxSxDh)

        s = keys_BxKxSxDh.shape[2]
        causal_LxS = jnp.arange(s)[None, :] <= query_slots_L[:, None]
        allowed_BxLxS = causal_LxS[None] & keys_mask_BxS[:, None, :]
        out_BxLxHxDh = _attend(q_BxLxHxDh, keys_BxKxSxDh, values_BxKxSxDh, allowed_BxLxS)
        out_BxLxHDh = out_BxLxHxDh.reshape(b, seq_len, h * dh).astype(x_BxLxD.dtype)
        out_BxLxD = _dense(self.o_proj, out_BxLxHDh)
        return out_BxLxD, new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, num: Numerics, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg.mlp_bias, num, rngs)
        self.up_proj = _linear(d, f, cfg.mlp_bias, num, rngs)
        self.down_proj = _linear(f, d, cfg.mlp_bias, num, rngs)

    def __call__(self, x_BxLxD):
        hidden_BxLxF = jax.nn.silu(_dense(self.gate_proj, x_BxLxD)) * _dense(self.up_proj, x_BxLxD)
        return _dense(self.down_proj, hidden_BxLxF)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, num: Numerics, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, num.params)
        self.self_attn = Attention(cfg, num, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, num.params)
        self.mlp = MLP(cfg, num, rngs)

    def __call__(self, x_BxLxD, positions_BxL, inv_freq, keys_mask_BxS, query_slots_L, cache_kv):
        attn_BxLxD, new_kv = self.self_attn(
            self.input_layernorm(x_BxLxD),
            positions_BxL,
            inv_freq,
            keys_mask_BxS,
            query_slots_L,
            cache_kv,
        )
        x_BxLxD = x_BxLxD + attn_BxLxD
        x_BxLxD = x_BxLxD + self.mlp(self.post_attention_layernorm(x_BxLxD))
        return x_BxLxD, new_kv


def _rematerialized(layer: Callable, *, scanned: bool) -> Callable:
    """The remat policy, for every way the blocks run: keep each layer's inputs, recompute its
    inside in the backward pass. Plain jax.checkpoint over the block's state, since `nnx.remat`
    refuses a module merged inside an outer jax.grad (the train step); inside a `lax.scan` CSE
    cannot merge the recomputation across iterations, so its guard is dropped there."""
    return jax.checkpoint(layer, prevent_cse=not scanned)


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose every parameter is the blocks' stacked on a leading layer axis."""
    graphdef, first = nnx.split(blocks[0])
    states = [first, *(nnx.state(block) for block in blocks[1:])]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


@struct.dataclass
class Unembedding:
    """The output projection in the layout its parameter is stored in: `w` is [V, D] when
    `vocab_major` (a tied embedding table), else [D, V] (an untied lm_head kernel).

    Logits contract `w` where it lies. Through the transposed table, the backward pass of a tied
    model computed the table's gradient as [D, V] and transposed it back (XLA CPU ran that as a
    separate kernel over the whole table, once per student view); read in place, one dot gives the
    gradient in the table's own layout, bitwise the same, and the student passes run faster.
    """

    w: jax.Array
    vocab_major: bool = struct.field(pytree_node=False)

    def logits(self, hidden_xD: jax.Array) -> jax.Array:
        """Float32 logits [..., V] of hidden states [..., D], computed in their dtype."""
        spec = "...d,vd->...v" if self.vocab_major else "...d,dv->...v"
        w = self.w.astype(hidden_xD.dtype)
        return jnp.einsum(spec, hidden_xD, w, preferred_element_type=jnp.float32)


@struct.dataclass
class ForwardOutput:
    hidden_BxLxD: jax.Array  # after the final norm: what the unembedding sees
    cache: KVCache | None
    # num_layers + 1 residual streams (embeddings first), [B, L, D] each, or [B, N, D] at the
    # slots `forward` was given (`layer_hidden_slots_BxN`).
    layer_hidden: tuple[jax.Array, ...] | None


def _take_slots(h_BxLxD: jax.Array, slots_BxN: jax.Array) -> jax.Array:
    """[B, N, D]: row b's stream at slots `slots_BxN[b]`."""
    return jnp.take_along_axis(h_BxLxD, slots_BxN[:, :, None], axis=1)


class Transformer(nnx.Module):
    """The decoder. `model(tokens)` gives fp32 logits; `forward` + `logits` give finer control."""

    def __init__(self, cfg: ModelConfig, numerics: Numerics = DEFAULT_NUMERICS, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.numerics = numerics
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=numerics.compute,
            param_dtype=numerics.params,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        # Built one by one either way, so a seed gives the same weights stacked or not.
        blocks = [Block(cfg, numerics, rngs) for _ in range(cfg.num_layers)]
        self.layers = stack_blocks(blocks) if numerics.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, numerics.params)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, numerics, rngs)

    def forward(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_BxL: jax.Array | None = None,
        mask_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
        return_layer_hidden: bool = False,
        layer_hidden_slots_BxN: jax.Array | None = None,
    ) -> ForwardOutput:
        """Runs the blocks. With `cache`, the tokens are written at slots `cache.index` onward.

        `mask_BxL` marks real tokens (False = padding; default all real); `positions_BxL` defaults
        to `positions_from_mask(mask_BxL)`, which is right for a full left-padded sequence. A decode
        step must pass its positions explicitly (the cache knows slots, not the row's token count).

        `return_layer_hidden` also returns every residual stream; with `layer_hidden_slots_BxN`
        (int [B, N]) each stream is gathered at those slots as soon as its layer has run, so only
        [B, N, D] per layer is kept: the whole streams of a 30-layer model at an evaluation batch
        are gigabytes.
        """
        cfg = self.cfg
        b, seq_len = tokens_BxL.shape
        if mask_BxL is None:
            mask_BxL = jnp.ones((b, seq_len), bool)
        if positions_BxL is None:
            positions_BxL = positions_from_mask(mask_BxL)
        inv_freq = rope_inv_freq(cfg)
        if cache is None:
            keys_mask_BxS = mask_BxL
            query_slots_L = jnp.arange(seq_len)
            new_cache = None
        else:
            keys_mask_BxS = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxL, (0, cache.index))
            query_slots_L = cache.index + jnp.arange(seq_len)
        if cache is not None and isinstance(cache.k, tuple) == self.numerics.scan_layers:
            raise ValueError(
                f"KV cache layout does not fit numerics.scan_layers={self.numerics.scan_layers}: "
                "make it with model.init_cache"
            )
        x_BxLxD = self.embed_tokens(tokens_BxL)
        args = (positions_BxL, inv_freq, keys_mask_BxS, query_slots_L)
        keep = None
        if return_layer_hidden:
            keep = (
                (lambda h: h)
                if layer_hidden_slots_BxN is None
                else functools.partial(_take_slots, slots_BxN=layer_hidden_slots_BxN)
            )
        (x_BxLxD,), new_kv, layer_hidden = self._run_blocks((x_BxLxD,), (args,), cache, keep)
        if cache is not None:
            new_cache = KVCache(
                k=new_kv[0], v=new_kv[1], mask_BxS=keys_mask_BxS, index=cache.index + seq_len
            )
        return ForwardOutput(
            hidden_BxLxD=self.norm(x_BxLxD),
            cache=new_cache,
            layer_hidden=layer_hidden,
        )

    def forward_views(self, views: Sequence[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, ...]:
        """Final-norm hidden states [B, L_i, D] of several sequences, each (token ids [B, L_i],
        mask [B, L_i]) as `forward` without a cache reads it, run through the blocks together:
        layer by layer, every view in turn.

        The numbers are `forward`'s, view for view. What changes is the backward pass: with
        `scan_layers` one scan carries every view, so each layer's parameter gradient sums the
        views' contributions inside the scan and one stacked gradient is built, not one per view
        added afterwards, which lowers XLA's temporaries of the train step.
        """
        inv_freq = rope_inv_freq(self.cfg)
        xs = tuple(self.embed_tokens(ids_BxL) for ids_BxL, _ in views)
        view_args = tuple(
            (positions_from_mask(mask_BxL), inv_freq, mask_BxL, jnp.arange(ids_BxL.shape[1]))
            for ids_BxL, mask_BxL in views
        )
        xs, _, _ = self._run_blocks(xs, view_args, None, None)
        return tuple(self.norm(x) for x in xs)

    def _run_blocks(self, xs, view_args, cache, keep):
        """Every block over the streams `xs` ([B, L_i, D] each, read with `view_args[i]`), layer
        by layer: one `lax.scan` over the stacked layers (and stacked cache) when
        `numerics.scan_layers`, else one after another. Returns (streams, (new k, new v) or None,
        kept streams or None). `cache` and `keep` (None: no streams kept; else what is kept of
        each residual stream, embeddings first) serve a single stream."""
        scanned = self.numerics.scan_layers

        def layer(block_def, block_state, xs, kv):
            """One block over every stream: (streams, the stream's new (k, v) or None, kept)."""
            block = nnx.merge(block_def, block_state)
            cache_kv = None if kv is None else (*kv, cache.index)
            outs = [block(x, *a, cache_kv) for x, a in zip(xs, view_args, strict=True)]
            xs = tuple(x for x, _ in outs)
            return xs, outs[0][1], None if keep is None else keep(xs[0])

        def step(block_def):
            run = functools.partial(layer, block_def)
            if self.numerics.remat and cache is None:  # a cache means decoding: no backward pass
                return _rematerialized(run, scanned=scanned)
            return run

        kept = None if keep is None else [keep(xs[0])]
        if scanned:
            block_def, stacked = nnx.split(self.layers)
            run = step(block_def)

            def body(xs, per_layer):
                block_state, kv = per_layer
                xs, new_kv, kept_layer = run(block_state, xs, kv)
                return xs, (new_kv, kept_layer)

            kv_in = None if cache is None else (cache.k, cache.v)
            xs, (new_kv, kept_NxBxLxD) = jax.lax.scan(body, xs, (stacked, kv_in))
            if keep is not None:
                kept += [kept_NxBxLxD[i] for i in range(kept_NxBxLxD.shape[0])]
        else:
            new_k, new_v = [], []
            for i, block in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                xs, layer_kv, kept_layer = step(nnx.graphdef(block))(nnx.state(block), xs, kv)
                if layer_kv is not None:
                    new_k.append(layer_kv[0])
                    new_v.append(layer_kv[1])
                if keep is not None:
                    kept.append(kept_layer)
            new_kv = None if cache is None else (tuple(new_k), tuple(new_v))
        return xs, new_kv, None if kept is None else tuple(kept)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache in the layout and dtype this model's numerics read."""
        n = self.numerics
        return init_cache(self.cfg, batch, max_len, n.compute_dtype, stacked=n.scan_layers)

    def unembedding(self) -> Unembedding:
        """The output projection as stored: the embedding table when tied, else the lm_head."""
        if self.cfg.tie_embeddings:
            return Unembedding(self.embed_tokens.embedding[...], vocab_major=True)
        return Unembedding(self.lm_head.kernel[...], vocab_major=False)

    def logits(self, hidden_BxLxD: jax.Array) -> jax.Array:
        """Float32 logits of final-norm hidden states (any leading shape)."""
        return self.unembedding().logits(hidden_BxLxD)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Float32 logits [B, L, V] of a full (optionally left-padded) sequence."""
        mask = None if attention_mask is None else attention_mask.astype(bool)
        out = self.forward(tokens_BxL, positions_BxL=positions, mask_BxL=mask)
        return self.logits(out.hidden_BxLxD)


# The parameters the layers only ever read cast to the compute dtype: dense kernels and biases
# (`nnx.Linear` promotes them to its `dtype`) and the embedding table (`nnx.Embed` for the lookup,
# `Unembedding.logits` in the hidden states' dtype). Norm scales are applied in float32: not these.
COMPUTE_CAST_PARAMS = frozenset({"kernel", "bias", "embedding"})


def cast_for_compute(state: nnx.State, numerics: Numerics) -> nnx.State:
    """`state` (a `Transformer`'s, from `nnx.split`) with the `COMPUTE_CAST_PARAMS` already in
    `numerics.compute`: the same values the layers' own casts produce, so the same outputs bit for
    bit, but cast once. A loop that reuses the weights (the sampler's decode loop) would otherwise
    read the stored copy and convert it on every iteration: float32 weights under bfloat16 compute
    are twice the bytes a memory-bound decode step must read. A no-op when the dtypes agree."""
    if numerics.params == numerics.compute:
        return state

    def cast(path, x):
        # The leaf's path ends [..., name, 'value'] (the nnx.Variable's own attribute).
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        if len(names) >= 2 and names[-2] in COMPUTE_CAST_PARAMS:
            return x.astype(numerics.compute)
        return x

    return jax.tree_util.tree_map_with_path(cast, state)


def create_model(
    cfg: ModelConfig, seed: int = 0, numerics: Numerics = DEFAULT_NUMERICS
) -> Transformer:
    """A randomly initialized model (normal(0.02) weights, unit norms)."""
    return Transformer(cfg, numerics, rngs=nnx.Rngs(seed))


# Parameters by their unrolled path (`layers.3.mlp.up_proj.kernel`), whatever the layout: the names
# HF folders map to, and the way to move weights between a stacked and an unrolled model.


def _unrolled_paths(model: Transformer) -> list[tuple[tuple, nnx.Variable, list[str] | None]]:
    """(flat state path, variable, its layers' unrolled paths if stacked else None)."""
    out = []
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        layer_paths = None
        if model.numerics.scan_layers and p[0] == "layers":
            rest = ".".join(map(str, p[1:]))
            layer_paths = [f"layers.{i}.{rest}" for i in range(model.cfg.num_layers)]
        out.append((p, var, layer_paths))
    return out


def unrolled_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """{unrolled path: shape} of every parameter; works on an abstract (`nnx.eval_shape`) model."""
    shapes = {}
    for p, var, layer_paths in _unrolled_paths(model):
        if layer_paths is None:
            shapes[".".join(map(str, p))] = tuple(var.shape)
        else:
            shapes.update(dict.fromkeys(layer_paths, tuple(var.shape[1:])))
    return shapes


def unrolled_param_getters(model: Transformer) -> dict[str, Callable[[], jax.Array]]:
    """{unrolled path: a function that returns that array}, a stacked parameter's layers sliced
    only when asked: a writer holds one tensor at a time, not a second copy of the model."""
    getters = {}
    for p, var, layer_paths in _unrolled_paths(model):
        if layer_paths is None:
            getters[".".join(map(str, p))] = lambda var=var: var[...]
        else:
            getters.update(
                {path: (lambda var=var, i=i: var[...][i]) for i, path in enumerate(layer_paths)}
            )
    return getters


def unrolled_params(model: Transformer) -> dict[str, jax.Array]:
    """{unrolled path: array} of every parameter, a stacked one split into its layers."""
    return {path: get() for path, get in unrolled_param_getters(model).items()}


def fill_unrolled(model: Transformer, get: Callable[[str], Any]) -> Transformer:
    """`model` (abstract or not) with every parameter set from `get(unrolled path)` (array-like),
    cast to the param dtype; a stacked parameter stacks its layers' arrays."""
    graphdef = nnx.graphdef(model)
    filled = []
    for p, var, layer_paths in _unrolled_paths(model):
        if layer_paths is None:
            value = jnp.asarray(get(".".join(map(str, p))), var.dtype)
        else:
            value = jnp.stack([jnp.asarray(get(path), var.dtype) for path in layer_paths])
        filled.append((p, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def with_numerics(model: Transformer, numerics: Numerics) -> Transformer:
    """The same weights run by `numerics`: stacked or unrolled layers, params cast to its dtype."""
    target = nnx.eval_shape(lambda: Transformer(model.cfg, numerics, rngs=nnx.Rngs(0)))
    return fill_unrolled(target, unrolled_params(model).__getitem__)
