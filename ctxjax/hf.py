"""Hugging Face folders <-> ctxjax: config mapping, strict safetensors load, export, tokenizers.

Nothing here imports torch. Weights are read as numpy arrays: through `safetensors.safe_open` for
the dtypes numpy knows, and straight from the file's bytes (offsets from its JSON header) for
bfloat16, which numpy cannot name but `ml_dtypes` can.

Loading is strict (Tunix's loader only warns on unmapped keys; a silently random weight is the worst
failure a parity test can miss): every checkpoint tensor must be consumed and every ctxjax parameter
filled, or the load fails listing the leftovers on both sides.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ctxjax.model import ModelConfig, Numerics, Transformer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SUPPORTED_ROPE_TYPES = ("default", "llama3")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# safetensors dtype tags numpy cannot name -> ml_dtypes, for the raw-bytes reader.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16}

# Used when a tokenizer has no chat template (base models, hand-built tokenizers): the context, a
# blank line, the prompt, a newline. Documented in README ("Chat rendering").
FALLBACK_SEPARATOR = "\n\n"


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------


def _need(hf_cfg: dict, key: str) -> Any:
    if hf_cfg.get(key) is None:
        raise ValueError(f"HF config lacks required key {key!r}")
    return hf_cfg[key]


def _max_positions(hf_cfg: dict) -> int:
    # The config classes' defaults when the key is absent: LlamaConfig 2048, Qwen2/Qwen3 32768.
    default = 2048 if hf_cfg.get("model_type") == "llama" else 32768
    return int(hf_cfg.get("max_position_embeddings") or default)


def _rope_from_hf(hf_cfg: dict) -> tuple[float, tuple | None]:
    """(rope_theta, ModelConfig.rope_scaling) with transformers v5's precedence rules.

    v5 writes `rope_parameters = {"rope_type", "rope_theta", ...}`; older configs have a top-level
    `rope_theta` and a `rope_scaling` dict (`type` or `rope_type`), which v5 still reads first.
    """
    rope = hf_cfg.get("rope_scaling") or hf_cfg.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(
            "per-layer-type rope_parameters are not supported (llama/qwen2/qwen3 "
            f"use one rope for all layers), got keys {sorted(rope)}"
        )
    theta = float(rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", hf_cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r}; supported: {_SUPPORTED_ROPE_TYPES}")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    if missing:
        raise ValueError(f"llama3 rope_parameters lack {missing}")
    # Same fallback order as HF's `standardize_rope_params`: a top-level value wins (Phi3 legacy),
    # then the rope dict's, then max_position_embeddings.
    orig = (
        hf_cfg.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings")
        or _max_positions(hf_cfg)
    )
    return theta, (
        "llama3",
        float(rope["factor"]),
        float(rope["low_freq_factor"]),
        float(rope["high_freq_factor"]),
        int(orig),
    )


def _check_full_attention(hf_cfg: dict, family: str) -> None:
    """Qwen2/Qwen3 may use sliding-window attention in some layers; ctxjax has none."""
    if family == "llama" or not hf_cfg.get("use_sliding_window"):
        return
    if hf_cfg.get("sliding_window") is None:  # HF then turns the window off
        return
    layer_types = hf_cfg.get("layer_types") or [
        "sliding_attention" if i >= hf_cfg.get("max_window_layers", 28) else "full_attention"
        for i in range(_need(hf_cfg, "num_hidden_layers"))
    ]
    if "sliding_attention" in layer_types:
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")


def config_from_hf(hf_cfg: dict) -> ModelConfig:
    """Maps an HF `config.json` dict (llama / qwen2 / qwen3) to a `ModelConfig` (the architecture).

    Biases follow the transformers modeling code, not the config keys alone: Llama and Qwen3 put
    `attention_bias` on q, k, v and o; Qwen2 always has q/k/v bias and never an o bias; only Llama
    reads `mlp_bias`.
    """
    family = hf_cfg.get("model_type")
    if family not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {family!r}; supported: {SUPPORTED_MODEL_TYPES}")
    act = hf_cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
    _check_full_attention(hf_cfg, family)
    hidden, heads = _need(hf_cfg, "hidden_size"), _need(hf_cfg, "num_attention_heads")
    # Qwen3Config's head_dim defaults to 128; Llama and Qwen2 derive it from the width.
    head_dim = hf_cfg.get("head_dim") or (128 if family == "qwen3" else hidden // heads)
    if head_dim * heads == hidden:
        head_dim = None  # ModelConfig's own default, so configs round-trip equal
    attention_bias = bool(hf_cfg.get("attention_bias", False))
    qkv_bias, o_bias = (True, False) if family == "qwen2" else (attention_bias, attention_bias)
    rope_theta, rope_scaling = _rope_from_hf(hf_cfg)
    return ModelConfig(
        family=family,
        vocab_size=_need(hf_cfg, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_need(hf_cfg, "intermediate_size"),
        num_layers=_need(hf_cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf_cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf_cfg.get("mlp_bias", False)) if family == "llama" else False,
        qk_norm=family == "qwen3",
        max_position_embeddings=_max_positions(hf_cfg),
    )


def _check_exportable(cfg: ModelConfig) -> None:
    """A ModelConfig can mix features no HF family has; those cannot be exported."""
    fam = cfg.family
    wanted = {  # field -> value the transformers modeling code of this family implies
        "llama": {"o_bias": cfg.qkv_bias, "qk_norm": False},
        "qwen2": {"qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False},
        "qwen3": {"o_bias": cfg.qkv_bias, "mlp_bias": False, "qk_norm": True},
    }[fam]
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(
                f"cannot export to HF {fam!r}: transformers' {fam} needs "
                f"model.{name}={value}, got {getattr(cfg, name)}"
            )


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The `config.json` dict transformers v5 needs to rebuild `cfg` as `<Family>ForCausalLM`,
    with weights stored in `dtype`."""
    _check_exportable(cfg)
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling is not None:
        kind, factor, low_ff, high_ff, orig = cfg.rope_scaling
        rope.update(
            rope_type=kind,
            factor=float(factor),
            low_freq_factor=float(low_ff),
            high_freq_factor=float(high_ff),
            original_max_position_embeddings=int(orig),
        )
    hf_cfg = {
        "architectures": [_ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "dtype": dtype,
        "use_cache": True,
    }
    if cfg.family == "llama":
        hf_cfg.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if cfg.family == "qwen3":
        hf_cfg.update(attention_bias=cfg.qkv_bias)
    if cfg.family in ("qwen2", "qwen3"):
        hf_cfg.update(use_sliding_window=False)
    return hf_cfg


# ---------------------------------------------------------------------------------------------------
# Parameter names: one table, both directions
# ---------------------------------------------------------------------------------------------------

# (HF tensor name, ctxjax parameter path, transpose). `{i}` is a layer index and `{lin}` / `{norm}` a
# submodule path, the same on both sides. HF Linear stores weight [out, in]; nnx.Linear's kernel is
# [in, out], hence the transpose (its own inverse, so export uses the same flag). The embedding is
# [V, D] on both sides. A None path marks a tensor that is derived, not learned: read and dropped.
_LIN = r"self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
_NORM = r"input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm"
_NAME_TABLE = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.layers.{i}.{lin}.weight", "layers.{i}.{lin}.kernel", True),
    ("model.layers.{i}.{lin}.bias", "layers.{i}.{lin}.bias", False),
    ("model.layers.{i}.{norm}.weight", "layers.{i}.{norm}.weight", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.self_attn.rotary_emb.inv_freq", None, False),  # old Llama checkpoints
)
_GROUPS = {"i": r"\d+", "lin": _LIN, "norm": _NORM}


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile(pattern)


_RULES = tuple(
    (_compile(hf), hf, None if ours is None else _compile(ours), ours, t)
    for hf, ours, t in _NAME_TABLE
)


def hf_to_ctxjax_name(hf_name: str) -> tuple[str | None, bool] | None:
    """(ctxjax path or None for a derived tensor, transpose) of an HF tensor; None if unknown."""
    for hf_re, _, _, ours, transpose in _RULES:
        m = hf_re.fullmatch(hf_name)
        if m:
            return (None if ours is None else ours.format(**m.groupdict())), transpose
    return None


def ctxjax_to_hf_name(path: str) -> tuple[str, bool]:
    """(HF tensor name, transpose) of a ctxjax parameter path like `layers.0.mlp.up_proj.kernel`."""
    for _, hf, ours_re, _, transpose in _RULES:
        m = ours_re.fullmatch(path) if ours_re is not None else None
        if m:
            return hf.format(**m.groupdict()), transpose
    raise ValueError(f"ctxjax parameter {path!r} has no HF name")


# ---------------------------------------------------------------------------------------------------
# Safetensors reading
# ---------------------------------------------------------------------------------------------------


def _read_header(file: str) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, byte offset of the data) of one file.

    `safe_open` validates the file first (a truncated or garbled file fails here, named).
    """
    if not os.path.isfile(file):
        raise FileNotFoundError(f"safetensors file not found: {file}")
    try:
        with safe_open(file, framework="numpy"):
            pass
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except Exception as e:  # SafetensorError, struct.error, JSONDecodeError: all mean "corrupt"
        raise ValueError(f"corrupt safetensors file {file}: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(file: str, name: str, entry: dict, data_start: int) -> np.ndarray:
    if entry["dtype"] not in _RAW_DTYPES:
        with safe_open(file, framework="numpy") as f:
            return f.get_tensor(name)
    begin, end = entry["data_offsets"]
    with open(file, "rb") as fh:  # numpy has no bfloat16: read the little-endian bytes ourselves
        fh.seek(data_start + begin)
        raw = fh.read(end - begin)
    return np.frombuffer(raw, dtype=_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_index(index: str) -> dict[str, str]:
    """The `weight_map` {tensor name: shard file name} of a sharded checkpoint's index."""
    try:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt index file {index}: {e!r}") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"corrupt index file {index}: weight_map is not an object")
    return weight_map


class _Checkpoint:
    """The tensors of a single-file or sharded checkpoint, by name, read on demand."""

    def __init__(self, folder: str):
        single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX_FILE)
        if os.path.exists(single):
            weight_map, files = None, [single]
        elif os.path.exists(index):
            weight_map = _read_index(index)
            files = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
        else:
            raise FileNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {folder}")
        self.entries: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, start)
        for file in files:
            header, start = _read_header(file)
            for name, entry in header.items():
                if name in self.entries:
                    raise ValueError(
                        f"tensor {name!r} appears in both {self.entries[name][0]} and {file}"
                    )
                self.entries[name] = (file, entry, start)
        for name, shard in (weight_map or {}).items():
            if name not in self.entries or os.path.basename(self.entries[name][0]) != shard:
                raise ValueError(f"{index} maps {name!r} to {shard}, which does not hold it")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        file, entry, start = self.entries[name]
        return _read_tensor(file, name, entry, start)


# ---------------------------------------------------------------------------------------------------
# Load and save
# ---------------------------------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> dict:
    """The `config.json` dict of an HF model folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{CONFIG_FILE} not found in {path}")
    try:
        with open(file) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {file}: {e}") from e


def _plan(
    ckpt: _Checkpoint, expected: dict[str, tuple[int, ...]], cfg: ModelConfig
) -> dict[str, tuple[str, bool]]:
    """{ctxjax path: (HF name, transpose)}, or a ValueError listing what is left on each side."""
    plan, unused = {}, []
    for hf_name in sorted(ckpt.entries):
        mapped = hf_to_ctxjax_name(hf_name)
        if mapped is not None and mapped[0] is None:
            continue  # derived buffer (rotary inv_freq): recomputed from the config
        if mapped is None or mapped[0] not in expected:
            if hf_name == "lm_head.weight" and cfg.tie_embeddings and _tied_copy(ckpt):
                continue  # some exporters write the tied head out too: the same numbers, twice
            unused.append(hf_name)
            continue
        plan[mapped[0]] = (hf_name, mapped[1])
    missing = [f"{p} <- {ctxjax_to_hf_name(p)[0]}" for p in expected if p not in plan]
    if unused or missing:
        raise ValueError(
            "checkpoint does not match the model config:\n"
            f"  checkpoint tensors not used ({len(unused)}): {unused}\n"
            f"  ctxjax params not filled, <- expected HF tensor ({len(missing)}): {missing}"
        )
    for path, (hf_name, transpose) in plan.items():
        shape = ckpt.shape(hf_name)
        got = shape[::-1] if transpose else shape
        if got != expected[path]:
            want = expected[path][::-1] if transpose else expected[path]
            raise ValueError(
                f"tensor {hf_name!r} has shape {shape}, the config needs {want} "
                f"(ctxjax {path} {expected[path]})"
            )
    return plan


def _tied_copy(ckpt: _Checkpoint) -> bool:
    if "model.embed_tokens.weight" not in ckpt.entries:
        return False
    head, embed = ckpt.read("lm_head.weight"), ckpt.read("model.embed_tokens.weight")
    if head.shape != embed.shape or not np.array_equal(head, embed):
        raise ValueError(
            "config says tie_word_embeddings=true but the checkpoint's lm_head.weight "
            "differs from model.embed_tokens.weight"
        )
    return True


def load_model(
    path: str | os.PathLike,
    numerics: Numerics | None = None,
    *,
    param_dtype: str | None = None,
    compute_dtype: str | None = None,
) -> Transformer:
    """A ctxjax `Transformer` from an HF folder (`config.json` + safetensors, single or sharded).

    The architecture comes from config.json; how it runs from `numerics`, or for short from
    `param_dtype` (default float32) and `compute_dtype` (default `param_dtype`).
    Strict: fails listing leftovers unless every checkpoint tensor fills exactly one parameter and
    every parameter is filled. The model is built abstractly (`nnx.eval_shape`), so no random
    weights are ever allocated; parameters are cast to the param dtype.
    """
    if numerics is None:
        param_dtype = param_dtype or "float32"
        numerics = Numerics(param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
    elif param_dtype is not None or compute_dtype is not None:
        raise ValueError("load_model takes numerics= or param_dtype=/compute_dtype=, not both")
    path = os.fspath(path)
    cfg = config_from_hf(read_hf_config(path))
    ckpt = _Checkpoint(path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, numerics, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    expected = {".".join(map(str, p)): tuple(v.shape) for p, v in flat}
    plan = _plan(ckpt, expected, cfg)
    dtype = numerics.params
    filled = []
    for p, var in flat:
        hf_name, transpose = plan[".".join(map(str, p))]
        arr = ckpt.read(hf_name)
        filled.append((p, var.replace(jnp.asarray(arr.T if transpose else arr, dtype=dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def save_model(model: Transformer, path: str | os.PathLike, *, dtype: str | None = None) -> str:
    """Writes an HF folder (`config.json` + `model.safetensors`) that transformers loads.

    `dtype` ("float32" | "bfloat16" | "float16") defaults to the model's param dtype. Returns path.
    """
    dtype = dtype or model.numerics.param_dtype
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"save dtype must be one of {sorted(_NUMPY_DTYPES)}, got {dtype!r}")
    hf_cfg = config_to_hf(model.cfg, dtype)
    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hf_name, transpose = ctxjax_to_hf_name(".".join(map(str, p)))
        arr = np.asarray(jax.device_get(var[...]))
        tensors[hf_name] = np.ascontiguousarray(
            (arr.T if transpose else arr).astype(_NUMPY_DTYPES[dtype])
        )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as fh:
        json.dump(hf_cfg, fh, indent=2)
    # "format": "pt" is what transformers itself writes and checks for.
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Loads a tokenizer from a local HF folder through `transformers.AutoTokenizer` (no network)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_chat(tokenizer: Any, context: str, prompt: str) -> list[int]:
    """Token ids of a chat turn ready for the assistant's answer.

    The context is the system message and the prompt the user message. An empty context renders no
    system message at all, so `render_chat(tok, "", x)` is exactly the no-context view `[x]`.
    Tokenizers without a chat template fall back to `context + "\n\n" + prompt + "\n"` (or
    `prompt + "\n"` with no context), with the tokenizer's BOS if it adds one.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if context:
            messages.insert(0, {"role": "system", "content": context})
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]
    text = (context + FALLBACK_SEPARATOR if context else "") + prompt + "\n"
    return [int(i) for i in tokenizer(text)["input_ids"]]
