"""Decoder-only transformer for the Llama, Qwen2 and Qwen3 families, in Flax NNX.

One module tree covers the three families through config flags: RMSNorm, rotary embeddings (RoPE),
grouped-query attention, SwiGLU MLP, optional q/k/v bias (Qwen2), optional per-head q/k RMSNorm
(Qwen3), tied or untied embeddings. Parameter names mirror the HF checkpoints (`embed_tokens`,
`layers[i].self_attn.q_proj`, ...) so `ctxjax.hf` maps them one to one.

Shape suffixes: B batch, L query length, S key length (cache slots), D model width, H query heads,
K key/value heads, G = H // K query heads per kv head, Dh head width, F MLP width, V vocabulary.

Slots and positions. Every token lives in a *slot* (its index in the padded sequence or in the KV
cache) and has a RoPE *position* (its index among the row's real tokens, `cumsum(mask) - 1`). A query
attends to keys whose slot is not after its own and whose mask bit is set. Left padding therefore
changes slots but not positions, so a row's logits do not depend on how much padding it got.

Architecture and numerics are separate: `ModelConfig` is what a checkpoint's config.json fixes,
`Numerics` is how this process runs it. Dtype policy: parameters in `param_dtype`, matmuls in
`compute_dtype`; RMSNorm statistics, softmax and the logits are float32.
"""

from __future__ import annotations

import dataclasses
import math
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
    # HF `rope_scaling` / `rope_parameters` beyond theta: None or ("llama3", factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings).
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
    remat: bool = (
        False  # rematerialize each block in the backward pass (per-layer activation memory)
    )

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
    k: tuple[jax.Array, ...]  # num_layers x [B, K, S, Dh]
    v: tuple[jax.Array, ...]
    mask_BxS: jax.Array  # bool: slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: first slot not yet written

    @property
    def max_len(self) -> int:
        return self.mask_BxS.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "float32") -> KVCache:
    """An empty cache of `max_len` slots in `dtype` (a DTYPES name: the model's compute dtype)."""
    dtype = DTYPES[dtype]
    shape = (batch, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(
        k=zeros, v=zeros, mask_BxS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32)
    )


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
    """RoPE positions of left- (or right-) padded rows: the count of real tokens before each slot."""
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
        b, l, _ = x_BxLxD.shape
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        q_BxLxHxDh = self.q_proj(x_BxLxD).reshape(b, l, h, dh)
        k_BxLxKxDh = self.k_proj(x_BxLxD).reshape(b, l, k, dh)
        v_BxLxKxDh = self.v_proj(x_BxLxD).reshape(b, l, k, dh)
        if cfg.qk_norm:
            q_BxLxHxDh, k_BxLxKxDh = self.q_norm(q_BxLxHxDh), self.k_norm(k_BxLxKxDh)
        q_BxLxHxDh = apply_rope(q_BxLxHxDh, positions_BxL, inv_freq)
        k_BxLxKxDh = apply_rope(k_BxLxKxDh, positions_BxL, inv_freq)

        if cache_kv is None:  # keys are exactly this call's tokens
            keys_BxKxSxDh = k_BxLxKxDh.transpose(0, 2, 1, 3)
            values_BxKxSxDh = v_BxLxKxDh.transpose(0, 2, 1, 3)
            new_kv = None
        else:  # write this call's tokens at slots [index, index + L) and attend over the whole cache
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
        g = h // k
        q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, k, g, dh)
        scores_BxKxGxLxS = jnp.einsum(
            "blkgd,bksd->bkgls",
            q_BxLxKxGxDh,
            keys_BxKxSxDh.astype(q_BxLxKxGxDh.dtype),
            preferred_element_type=jnp.float32,
        ) / math.sqrt(dh)
        causal_LxS = jnp.arange(s)[None, :] <= query_slots_L[:, None]
        allowed_BxLxS = causal_LxS[None] & keys_mask_BxS[:, None, :]
        # A finite floor instead of -inf: padding queries see no key at all and must stay NaN-free.
        scores_BxKxGxLxS = jnp.where(allowed_BxLxS[:, None, None], scores_BxKxGxLxS, -1e30)
        probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1)
        out_BxLxKxGxDh = jnp.einsum(
            "bkgls,bksd->blkgd", probs_BxKxGxLxS.astype(values_BxKxSxDh.dtype), values_BxKxSxDh
        )
        out_BxLxD = self.o_proj(out_BxLxKxGxDh.reshape(b, l, h * dh).astype(x_BxLxD.dtype))
        return out_BxLxD, new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, num: Numerics, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(d, f, cfg.mlp_bias, num, rngs)
        self.up_proj = _linear(d, f, cfg.mlp_bias, num, rngs)
        self.down_proj = _linear(f, d, cfg.mlp_bias, num, rngs)

    def __call__(self, x_BxLxD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD))


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


@struct.dataclass
class ForwardOutput:
    hidden_BxLxD: jax.Array  # after the final norm: what the unembedding sees
    cache: KVCache | None
    layer_hidden: tuple[jax.Array, ...] | None  # num_layers + 1 residual streams (embeddings first)


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
        self.layers = nnx.List([Block(cfg, numerics, rngs) for _ in range(cfg.num_layers)])
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
    ) -> ForwardOutput:
        """Runs the blocks. With `cache`, the tokens are written at slots `cache.index` onward.

        `mask_BxL` marks real tokens (False = padding; default all real); `positions_BxL` defaults to
        `positions_from_mask(mask_BxL)`, which is right for a full left-padded sequence. A decode step
        must pass its positions explicitly (the cache knows the slots, not the row's token count).
        """
        cfg = self.cfg
        b, l = tokens_BxL.shape
        if mask_BxL is None:
            mask_BxL = jnp.ones((b, l), bool)
        if positions_BxL is None:
            positions_BxL = positions_from_mask(mask_BxL)
        inv_freq = rope_inv_freq(cfg)
        if cache is None:
            keys_mask_BxS = mask_BxL
            query_slots_L = jnp.arange(l)
            new_cache = None
        else:
            keys_mask_BxS = jax.lax.dynamic_update_slice(cache.mask_BxS, mask_BxL, (0, cache.index))
            query_slots_L = cache.index + jnp.arange(l)
        x_BxLxD = self.embed_tokens(tokens_BxL)
        layer_hidden = [x_BxLxD] if return_layer_hidden else None
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i], cache.index)
            if self.numerics.remat and cache is None:
                # Plain jax.checkpoint over the block's state: `nnx.remat` refuses to run on a module
                # merged inside an outer jax.grad (the train step), a pure function works everywhere.
                block_def, block_state = nnx.split(block)
                run = lambda st, *a: nnx.merge(block_def, st)(*a, None)  # noqa: E731
                x_BxLxD, kv = jax.checkpoint(run)(
                    block_state, x_BxLxD, positions_BxL, inv_freq, keys_mask_BxS, query_slots_L
                )
            else:
                x_BxLxD, kv = block(
                    x_BxLxD, positions_BxL, inv_freq, keys_mask_BxS, query_slots_L, cache_kv
                )
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            if return_layer_hidden:
                layer_hidden.append(x_BxLxD)
        if cache is not None:
            new_cache = KVCache(
                k=tuple(new_k), v=tuple(new_v), mask_BxS=keys_mask_BxS, index=cache.index + l
            )
        return ForwardOutput(
            hidden_BxLxD=self.norm(x_BxLxD),
            cache=new_cache,
            layer_hidden=None if layer_hidden is None else tuple(layer_hidden),
        )

    def unembed_matrix(self) -> jax.Array:
        """The output projection as [D, V] (the transposed embedding table when tied)."""
        if self.cfg.tie_embeddings:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden_BxLxD: jax.Array) -> jax.Array:
        """Float32 logits of final-norm hidden states (any leading shape)."""
        w_DxV = self.unembed_matrix().astype(hidden_BxLxD.dtype)
        return jnp.einsum("...d,dv->...v", hidden_BxLxD, w_DxV, preferred_element_type=jnp.float32)

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


def create_model(
    cfg: ModelConfig, seed: int = 0, numerics: Numerics = DEFAULT_NUMERICS
) -> Transformer:
    """A randomly initialized model (normal(0.02) weights, unit norms)."""
    return Transformer(cfg, numerics, rngs=nnx.Rngs(seed))
