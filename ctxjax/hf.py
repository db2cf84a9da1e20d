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
import shutil
import struct
import uuid
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from ctxjax.model import (
    FAMILIES,
    ModelConfig,
    Numerics,
    Transformer,
    fill_unrolled,
    unrolled_param_getters,
    unrolled_shapes,
)

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
# numpy dtype -> safetensors dtype tag, for the streaming writer.
_SAFETENSORS_TAGS = {
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float16): "F16",
}

# Used when a tokenizer has no chat template (base models, hand-built tokenizers): the context, a
# blank line, the prompt, a newline. Documented in docs/architecture.md ("Chat rendering").
FALLBACK_SEPARATOR = "\n\n"
# Where `render_chat` puts the context: the system message, or in front of the user message (for
# templates with no system role), separated by FALLBACK_SEPARATOR.
CHAT_PLACEMENTS = ("system", "user")
GENERATION_CONFIG_FILE = "generation_config.json"
# The ids `generate` needs to stop and pad; exported into config.json and generation_config.json.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# `load_tokenizer`'s loading options, which `save_pretrained` would persist into an export.
LOAD_ONLY_TOKENIZER_KWARGS = ("local_files_only",)
TOKENIZER_FILE = "tokenizer.json"


class HFFolderError(ValueError):
    """A model or tokenizer folder that cannot be used. The message is one line naming the path,
    so an entry point can print it instead of a traceback."""


class HFFolderNotFoundError(HFFolderError, FileNotFoundError):
    """A folder or a file it must hold is missing (or is a file where a folder is needed)."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _folder(path: str | os.PathLike, what: str = "model") -> str:
    """`path` as a str with `~` expanded, or an error if it is not an existing folder."""
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise HFFolderNotFoundError(f"{what} folder not found: {path}")
    if not os.path.isdir(path):
        raise HFFolderNotFoundError(f"{what} path is a file, not a folder: {path}")
    return path


# What a ctxjax run leaves beside its config.json: a folder holding one is a run, not a model.
RUN_FOLDER_MARKERS = ("summary.json", "checkpoints", "metrics.jsonl")


def check_model_folder(path: str | os.PathLike, what: str = "model") -> str:
    """`path` (`~` expanded) when it is an HF model folder (a config.json with a `model_type`),
    else a one-line error naming it and what it is instead (a ctxjax run folder: use its final/)."""
    path = _folder(path, what)
    if any(os.path.exists(os.path.join(path, m)) for m in RUN_FOLDER_MARKERS):
        final = os.path.join(path, "final")
        where = f"its model is {final}" if os.path.isdir(final) else "it has no final/ yet"
        raise HFFolderError(f"{what} {path} is a ctxjax run folder, not a model: {where}")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise HFFolderNotFoundError(f"{what} folder {path} has no {CONFIG_FILE} (not a model)")
    if "model_type" not in read_json(file):
        raise HFFolderError(f"{what} folder {path}: {file} has no model_type (not an HF model)")
    return path


def read_json(file: str) -> dict:
    try:
        with open(file) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFolderError(f"corrupt {file}: {one_line(e)}") from e
    if not isinstance(data, dict):
        raise HFFolderError(f"corrupt {file}: expected a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


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
    if family not in FAMILIES:
        raise ValueError(f"unsupported model_type {family!r}; supported: {FAMILIES}")
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


# --------------------------------------------------------------------------------------------------
# Parameter names: one table, both directions
# --------------------------------------------------------------------------------------------------

# (HF tensor name, ctxjax parameter path, transpose). `{i}` is a layer index and `{lin}` /
# `{norm}` a submodule path, the same on both sides. HF Linear stores weight [out, in];
# nnx.Linear's kernel is [in, out], hence the transpose (its own inverse, so export uses the same
# flag). The embedding is [V, D] on both sides. A None path marks a tensor that is derived, not
# learned: read and dropped.
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
    """(HF tensor name, transpose) of a ctxjax parameter path like `layers.0.mlp.up_proj.kernel`.

    Paths are unrolled (one layer each): a `scan_layers` model's stacked parameters are named per
    layer by `model.unrolled_params`/`unrolled_shapes`, as load and save do."""
    for _, hf, ours_re, _, transpose in _RULES:
        m = ours_re.fullmatch(path) if ours_re is not None else None
        if m:
            return hf.format(**m.groupdict()), transpose
    raise ValueError(f"ctxjax parameter {path!r} has no HF name")


# --------------------------------------------------------------------------------------------------
# Safetensors reading
# --------------------------------------------------------------------------------------------------


def _read_header(file: str) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, byte offset of the data) of one file.

    `safe_open` validates the file first (a truncated or garbled file fails here, named).
    """
    if not os.path.isfile(file):
        raise HFFolderNotFoundError(f"safetensors file not found: {file}")
    try:
        with safe_open(file, framework="numpy"):
            pass
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except Exception as e:  # SafetensorError, struct.error, JSONDecodeError: all mean "corrupt"
        raise HFFolderError(f"corrupt safetensors file {file}: {one_line(e)}") from e
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
    if len(raw) != end - begin:  # safe_open checked the sizes; the file changed since
        raise HFFolderError(f"corrupt safetensors file {file}: tensor {name!r} is truncated")
    return np.frombuffer(raw, dtype=_RAW_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_index(index: str) -> dict[str, str]:
    """The `weight_map` {tensor name: shard file name} of a sharded checkpoint's index."""
    try:
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFFolderError(f"corrupt index file {index}: {one_line(e)!r}") from e
    if not isinstance(weight_map, dict):
        raise HFFolderError(f"corrupt index file {index}: weight_map is not an object")
    return weight_map


class _Checkpoint:
    """The tensors of a single-file or sharded checkpoint, by name, read on demand."""

    def __init__(self, folder: str | os.PathLike):
        folder = _folder(folder)
        single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX_FILE)
        if os.path.exists(single):
            weight_map, files = None, [single]
        elif os.path.exists(index):
            weight_map = _read_index(index)
            files = [os.path.join(folder, shard) for shard in sorted(set(weight_map.values()))]
        else:
            raise HFFolderNotFoundError(f"no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in {folder}")
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
        """The tensor's array; NaN or inf is an error (a model that would train or answer garbage),
        checked here as each tensor is read, which costs one pass over bytes already in memory."""
        file, entry, start = self.entries[name]
        arr = _read_tensor(file, name, entry, start)
        if arr.dtype.kind == "f" or arr.dtype in _RAW_DTYPES.values():  # floats only
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise HFFolderError(f"tensor {name!r} in {file} holds {bad} NaN/inf values")
        return arr


# --------------------------------------------------------------------------------------------------
# Safetensors writing
# --------------------------------------------------------------------------------------------------


def write_safetensors(
    file: str,
    entries: dict[str, tuple[tuple[int, ...], Any]],
    get: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file one tensor at a time: `entries` {name: (shape, numpy dtype)}
    fixes the header, then `get(name)` supplies each tensor as it is written. The library's
    `save_file` needs every tensor in memory at once and serializes them into one more buffer:
    two extra copies of the weights at the moment of export.

    The layout is the format's: an 8-byte little-endian header length, the JSON header (padded with
    spaces to a multiple of 8), then the tensors' little-endian bytes back to back in header order.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (shape, dtype) in entries.items():
        dtype = np.dtype(dtype)
        if dtype not in _SAFETENSORS_TAGS:
            raise ValueError(f"safetensors writer: tensor {name!r} has unsupported dtype {dtype}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_TAGS[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, (shape, dtype) in entries.items():
            arr = np.ascontiguousarray(get(name), dtype=np.dtype(dtype).newbyteorder("<"))
            if arr.shape != tuple(shape):
                raise ValueError(
                    f"safetensors writer: tensor {name!r} has shape {arr.shape}, header says "
                    f"{tuple(shape)}"
                )
            fh.write(arr.reshape(-1).view(np.uint8).data)  # bytes as they lie (bf16 too)


# --------------------------------------------------------------------------------------------------
# Load and save
# --------------------------------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike) -> dict:
    """The `config.json` dict of an HF model folder (`~` expanded); one-line errors naming the
    path for a missing folder, a file given as the folder, a missing or corrupt config.json."""
    path = _folder(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise HFFolderNotFoundError(f"{CONFIG_FILE} not found in {path}")
    return read_json(file)


def read_architecture(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of an HF model folder, from its config.json alone (no weights read); an
    unsupported or incomplete config is a one-line `HFFolderError` naming the file."""
    hf_cfg = read_hf_config(path)
    try:
        return config_from_hf(hf_cfg)
    except HFFolderError:
        raise
    except ValueError as e:
        file = os.path.join(os.path.expanduser(os.fspath(path)), CONFIG_FILE)
        raise HFFolderError(f"{file}: {one_line(e)}") from e


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
    Strict: fails listing leftovers unless every checkpoint tensor fills exactly one parameter (one
    layer of a stacked one, with `numerics.scan_layers`) and every parameter is filled. The model
    is built abstractly (`nnx.eval_shape`), so no random weights are ever allocated; parameters
    are cast to the param dtype.
    """
    if numerics is None:
        param_dtype = param_dtype or "float32"
        numerics = Numerics(param_dtype=param_dtype, compute_dtype=compute_dtype or param_dtype)
    elif param_dtype is not None or compute_dtype is not None:
        raise ValueError("load_model takes numerics= or param_dtype=/compute_dtype=, not both")
    path = os.fspath(path)
    cfg = read_architecture(path)
    ckpt = _Checkpoint(path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, numerics, rngs=nnx.Rngs(0)))
    # Planned by unrolled paths (one per HF tensor); a `scan_layers` model stacks them as it fills.
    plan = _plan(ckpt, unrolled_shapes(abstract), cfg)

    def read(path: str) -> np.ndarray:
        hf_name, transpose = plan[path]
        arr = ckpt.read(hf_name)
        return arr.T if transpose else arr

    return fill_unrolled(abstract, read)


def save_model(model: Transformer, path: str | os.PathLike, *, dtype: str | None = None) -> str:
    """Writes an HF folder (`config.json` + `model.safetensors`) that transformers loads.

    `dtype` ("float32" | "bfloat16" | "float16") defaults to the model's param dtype. Returns path.
    """
    dtype = dtype or model.numerics.param_dtype
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(f"save dtype must be one of {sorted(_NUMPY_DTYPES)}, got {dtype!r}")
    hf_cfg = config_to_hf(model.cfg, dtype)
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
    getters = unrolled_param_getters(model)  # per-layer tensors, stacked or not
    shapes = unrolled_shapes(model)
    entries, ours_of = {}, {}
    for ours, shape in shapes.items():
        hf_name, transpose = ctxjax_to_hf_name(ours)
        entries[hf_name] = (shape[::-1] if transpose else shape, np_dtype)
        ours_of[hf_name] = (ours, transpose)

    def get(hf_name: str) -> np.ndarray:  # one tensor on the host at a time
        ours, transpose = ours_of[hf_name]
        arr = np.asarray(jax.device_get(getters[ours]()))
        return (arr.T if transpose else arr).astype(np_dtype)

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as fh:
        json.dump(hf_cfg, fh, indent=2)
    # "format": "pt" is what transformers itself writes and checks for.
    write_safetensors(os.path.join(path, WEIGHTS_FILE), entries, get, metadata={"format": "pt"})
    return path


def export_pretrained(
    model: Transformer,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    dtype: str | None = None,
) -> str:
    """Writes a complete HF folder that `generate` uses like the source model: stops at its EOS.

    `save_model`'s weights and config.json, plus bos/eos/pad token ids in config.json (from the
    `source` folder's config.json, then its generation_config.json, then the tokenizer), a
    generation_config.json (the source's, its missing ids filled the same way; else built from
    those ids) and the tokenizer's files. Without the ids, transformers' `generate` runs past the
    chat EOS (`<|im_end|>`) and invents a new turn.

    Atomic: written into a temporary sibling folder, renamed to `path` only when complete; an
    existing `path` is renamed aside first and deleted last, so a crash leaves either the old
    folder or the new one at `path`, never a half-written one. Returns the absolute path.
    """
    source = None if source is None else _folder(source, "source model")
    ids = _token_ids(tokenizer, source)

    def write(folder: str) -> None:
        save_model(model, folder, dtype=dtype)
        config_file = os.path.join(folder, CONFIG_FILE)
        write_json(config_file, {**read_json(config_file), **ids})
        generation = {}
        if source is not None and os.path.isfile(os.path.join(source, GENERATION_CONFIG_FILE)):
            generation = read_json(os.path.join(source, GENERATION_CONFIG_FILE))
        missing = {k: v for k, v in ids.items() if generation.get(k) is None}
        write_json(os.path.join(folder, GENERATION_CONFIG_FILE), {**generation, **missing})
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(path, write)


def _token_ids(tokenizer: Any, source: str | None) -> dict[str, Any]:
    """{bos/eos/pad_token_id: id}, the first non-None of: the source's config.json, its
    generation_config.json, the tokenizer. Keys found nowhere are left out."""
    layers = []
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE) if source is not None else ():
        if os.path.isfile(os.path.join(source, name)):
            layers.append(read_json(os.path.join(source, name)))
    layers.append({key: getattr(tokenizer, key, None) for key in TOKEN_ID_KEYS})
    ids = {}
    for key in TOKEN_ID_KEYS:
        found = [layer[key] for layer in layers if layer.get(key) is not None]
        if found:
            ids[key] = found[0]
    return ids


def write_json(file: str, data: dict) -> None:
    with open(file, "w") as fh:
        json.dump(data, fh, indent=2)


def write_folder_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Runs `write(tmp)` on a fresh sibling folder, then swaps it in for `path` (see
    `export_pretrained`). Unique names (not `tempfile.mkdtemp`, whose 0700 mode would stick to the
    final folder) so the folder gets the umask's permissions like any other."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise HFFolderError(f"export path is a file, not a folder: {path}")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = (os.path.join(parent, f".{name}.{kind}-{tag}") for kind in ("tmp", "old"))
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    had_old = os.path.isdir(path)
    if had_old:
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if had_old:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if had_old:
        shutil.rmtree(old)
    # Half-written folders an interrupted export of this folder left (killed mid-write): the
    # folder is whole now, and they hold nothing else.
    for leftover in os.listdir(parent):
        if leftover.startswith(f".{name}.tmp-"):
            shutil.rmtree(os.path.join(parent, leftover), ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Loads a tokenizer from a local HF folder through `transformers.AutoTokenizer` (no network).

    `~` is expanded; a missing folder or one transformers cannot read is a one-line error naming
    the path. The `local_files_only` loading option is not kept in the tokenizer's settings, so
    `save_pretrained` does not write it into the tokenizer_config.json of an exported folder.
    """
    from transformers import AutoTokenizer

    path = _folder(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        # transformers then suggests installing sentencepiece or tiktoken: say what is missing.
        missing = (
            "" if os.path.exists(os.path.join(path, TOKENIZER_FILE)) else " (no tokenizer.json)"
        )
        raise HFFolderError(f"cannot load a tokenizer from {path}{missing}: {one_line(e)}") from e
    for key in LOAD_ONLY_TOKENIZER_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def eos_and_pad(tokenizer: Any) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a tokenizer: the one place that decides which ids stop and pad.

    Generation needs a stop token, so a tokenizer without EOS is an error. Without a pad token, EOS
    pads: padded positions are masked out everywhere, so any valid id will do.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; set one (generation needs a stop token)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return (int(eos),), int(pad)


def check_vocab(tokenizer: Any, model_cfg: ModelConfig, where: str) -> None:
    """Refuses a model whose vocabulary is smaller than its tokenizer's.

    Token ids past the embedding table do not fail in JAX: an out-of-range gather is clamped, so
    such a token would silently read another token's embedding. A larger model vocabulary (padded
    to a multiple of 64, say) is fine. `where` names the model in the error (e.g. "student").
    """
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; ids >= {model_cfg.vocab_size} have no embedding"
        )


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    named = {
        f"{k}_token": getattr(tokenizer, f"{k}_token", None) for k in ("bos", "eos", "pad", "unk")
    }
    return {**named, "all special tokens": sorted(tokenizer.all_special_tokens)}


def check_same_tokenizer(tok_a: Any, tok_b: Any) -> None:
    """Refuses two tokenizers that map text to different ids or mark different special tokens.

    The teacher scores the student's tokens, so a teacher with its own tokenizer must have the
    same vocabulary (token -> id) and the same special tokens (an EOS that differs would end a turn
    for one model and not the other). The error names the first differences.
    """
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    if vocab_a != vocab_b:
        diff = sorted(t for t in set(vocab_a) | set(vocab_b) if vocab_a.get(t) != vocab_b.get(t))
        shown = ", ".join(f"{t!r}: {vocab_a.get(t)} vs {vocab_b.get(t)}" for t in diff[:5])
        raise ValueError(
            f"tokenizers differ: {len(diff)} tokens have different ids (sizes {len(vocab_a)} vs "
            f"{len(vocab_b)}), e.g. {shown}"
        )
    special_a, special_b = _special_tokens(tok_a), _special_tokens(tok_b)
    diff = [
        f"{k} {special_a[k]!r} vs {special_b[k]!r}"
        for k in special_a
        if special_a[k] != special_b[k]
    ]
    if diff:
        raise ValueError(f"tokenizers differ in special tokens: {'; '.join(diff)}")


def render_chat(
    tokenizer: Any, context: str, prompt: str, *, placement: str = "system"
) -> list[int]:
    """Token ids of a chat turn ready for the assistant's answer, exactly as the tokenizer's chat
    template renders the messages (`apply_chat_template(..., add_generation_prompt=True)`).

    `placement="system"`: the context is the system message and the prompt the user message.
    `placement="user"`: the context goes in front of the prompt in the user message, separated by
    a blank line, for templates with no system role. An empty context adds no message and no text,
    but the template decides what the turn holds: templates that insert a default system prompt
    when there is none (SmolLM2's "You are a helpful AI assistant named SmolLM...", Qwen2.5's
    "You are Qwen...") render it in the no-context view, and with `placement="system"` the context
    replaces it. Tokenizers without a chat template fall back to `context + "\n\n" + prompt + "\n"`
    (or `prompt + "\n"` with no context), with the tokenizer's BOS if it adds one.
    """
    if placement not in CHAT_PLACEMENTS:
        raise ValueError(f"chat placement must be one of {CHAT_PLACEMENTS}, got {placement!r}")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        if context and placement == "user":
            messages[0]["content"] = context + FALLBACK_SEPARATOR + prompt
        elif context:
            messages.insert(0, {"role": "system", "content": context})
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return [int(i) for i in ids]
    text = (context + FALLBACK_SEPARATOR if context else "") + prompt + "\n"
    return [int(i) for i in tokenizer(text)["input_ids"]]
