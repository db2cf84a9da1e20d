"""Tiny random HF checkpoints and HF reference outputs, built with transformers + torch.

The only place the tests touch torch. Shared by the HF parity tests (`test_hf.py`) and the sampler's
`generate` parity tests, so the helpers stay general: any family, tied or not, fp32 or bf16, any
config override.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

FAMILY_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
# Qwen3's head_dim is its own field: pick one that is not hidden_size // heads (= 16) so a loader
# that derives it from the width fails.
FAMILY_TINY = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 24}}


def tiny_hf_config(family: str, *, tie: bool = True, **overrides) -> transformers.PreTrainedConfig:
    """The tiny config of `family` ("llama" | "qwen2" | "qwen3") with `overrides` on top."""
    kwargs = {**TINY, **FAMILY_TINY[family], "tie_word_embeddings": tie, **overrides}
    return FAMILY_CONFIGS[family](**kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms and biases included, so a weight the loader skips shows.

    Larger than HF's init (std 0.02) so logits spread over several units and a small mismatch is
    not hidden under a tolerance.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.3 * noise
        elif name.endswith("embed_tokens.weight"):
            value = 0.5 * noise
        elif name.endswith(".bias"):
            value = 0.3 * noise
        else:  # [out, in] matrices: unit-variance outputs
            value = noise / np.sqrt(p.shape[-1])
        p.copy_(value.to(p.dtype))


def make_tiny_hf(
    family: str,
    path: str | os.PathLike,
    *,
    tie: bool = True,
    seed: int = 0,
    dtype: str = "float32",
    **overrides,
) -> str:
    """Saves a tiny random `<Family>ForCausalLM` to `path` (`save_pretrained`) and returns the path.

    `dtype` "bfloat16" stores bf16 weights (rounded from the fp32 random draw). `overrides` go to
    the config class (e.g. `attention_bias=True`, `rope_parameters={...}`, `num_hidden_layers=3`).
    """
    cfg = tiny_hf_config(family, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    model.to(getattr(torch, dtype)).save_pretrained(os.fspath(path))
    return os.fspath(path)


def load_hf(path: str | os.PathLike, dtype: str = "float32") -> transformers.PreTrainedModel:
    """An HF model from a local folder, eager attention, eval mode, weights upcast to `dtype`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(path),
        dtype=getattr(torch, dtype),
        attn_implementation="eager",
        local_files_only=True,
    )
    return model.eval()


def hf_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Positions from the mask, as HF `generate` builds them: cumsum - 1, padding set to 0.

    A plain HF forward uses arange whatever the mask; RoPE scores depend only on position
    differences, so left-padded logits agree either way up to rounding, but with these positions
    HF does the same arithmetic as ctxjax (and as its own KV-cache decoding).
    """
    mask = np.asarray(attention_mask, np.int64)
    return np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)


@torch.no_grad()
def hf_logits(path_or_model, ids, attention_mask=None) -> np.ndarray:
    """float32 numpy logits [B, L, V] from HF on `ids` (left padding allowed, positions from mask).

    `path_or_model` is a folder (loaded with `load_hf`) or an already loaded HF model.
    """
    model = path_or_model
    if isinstance(path_or_model, (str, os.PathLike)):
        model = load_hf(path_or_model)
    ids = np.asarray(ids, np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    out = model(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        position_ids=torch.from_numpy(hf_positions(mask)),
    )
    return out.logits.float().numpy()
