"""GGUF files (llama.cpp's format) -> HF folders that `ctxjax.hf` loads.

`convert_gguf` reads a llama-family GGUF with the `gguf` package's reader, dequantizes every tensor
to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants...: whatever `gguf.quants.dequantize`
supports), renames it to its HF name, undoes llama.cpp's rotary row permutation of q/k, and writes
config.json (from the `llama.*` metadata, through `hf.config_to_hf`), model.safetensors,
generation_config.json and the tokenizer files (transformers builds the tokenizer, chat template
included, from the file's `tokenizer.*` metadata).

The `gguf` package is optional: this module imports it, and transformers, only inside the
functions, so `import ctxjax` never needs them; torch is never imported.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from ctxjax.hf import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    LOAD_ONLY_TOKENIZER_KWARGS,
    WEIGHTS_FILE,
    HFFolderError,
    config_to_hf,
    one_line,
    read_json,
    write_folder_atomically,
    write_json,
    write_safetensors,
)
from ctxjax.model import ModelConfig

TOKENIZER_FILE = "tokenizer.json"

ARCHITECTURE = "llama"  # general.architecture values convert_gguf reads
# GGUF tensor names (llama.cpp's `gguf.constants.TENSOR_NAMES`) -> HF names. `{i}` is a layer.
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(?P<i>\d+)\.(?P<part>\w+)\.weight")
# GGUF token-id keys -> the config.json / generation_config.json keys `generate` needs.
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_REQUIRED = object()


class GGUFError(HFFolderError):
    """A GGUF file that cannot be converted; the message is one line naming the file."""


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading GGUF files needs the gguf package: pip install gguf (or ctxjax[gguf])"
        ) from e
    return gguf


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a llama GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn
    .q_proj.weight`); a ValueError for a tensor ctxjax has no place for (biases, MoE experts,
    llama3's `rope_freqs`)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m["part"] not in _BLOCK_NAMES:
        raise ValueError(f"tensor {gguf_name!r} has no place in a ctxjax {ARCHITECTURE} model")
    return f"model.layers.{m['i']}.{_BLOCK_NAMES[m['part']]}.weight"


def unpermute_rotary(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (`LlamaModel.permute` in convert_hf_to_gguf.py).

    HF rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs, so on
    conversion each head's rows go from [half, pair] order to [pair, half] order:
    `w.reshape(n_head, 2, d // 2, ...).swapaxes(1, 2)`. Swapping back is its inverse. `n_head` is
    the query heads for q and the kv heads for k.
    """
    half = w_OxI.shape[0] // n_head // 2
    w = w_OxI.reshape(n_head, half, 2, *w_OxI.shape[1:])
    return w.swapaxes(1, 2).reshape(w_OxI.shape)


def _field(reader: Any, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"metadata key {key!r} is missing")
        return default
    return field.contents()


def _config(reader: Any, shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The architecture from the `llama.*` metadata; the vocabulary from the embedding's rows.

    ctxjax's llama has full rotary, default rope and no experts: anything else is refused, not
    converted into a model that would answer garbage.
    """
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"general.architecture is {arch!r}; only {ARCHITECTURE!r} is supported")

    def key(name: str, default: Any = _REQUIRED) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    if key("expert_count", 0):
        raise ValueError(f"{arch}.expert_count={key('expert_count')}: MoE is not supported")
    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{arch}.rope.scaling.type={scaling!r} is not supported (only none)")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = int(key("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"partial rotary ({rotary} of {head_dim} dims) is not supported")
    if "model.embed_tokens.weight" not in shapes:
        raise ValueError("no token_embd.weight tensor")
    vocab = shapes["model.embed_tokens.weight"][0]
    if int(key("vocab_size", vocab)) != vocab:
        raise ValueError(f"{arch}.vocab_size={key('vocab_size')} but token_embd has {vocab} rows")
    return ModelConfig(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=None if head_dim * heads == hidden else head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_embeddings="lm_head.weight" not in shapes,
        max_position_embeddings=int(key("context_length")),
    )


def _dequantize(gguf: Any, tensor: Any) -> np.ndarray:
    """The tensor as float32 in HF's (numpy) axis order: GGUF lists dims fastest-first."""
    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(
            f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the installed "
            "gguf package cannot dequantize"
        ) from e
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)


def read_gguf_weights(reader: Any, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """{HF name: float32 array} of every tensor of a GGUF reader, q/k un-permuted."""
    gguf = _import_gguf()
    out = {}
    for tensor in reader.tensors:
        arr = _dequantize(gguf, tensor)
        name = hf_tensor_name(tensor.name)
        if name.endswith("self_attn.q_proj.weight"):
            arr = unpermute_rotary(arr, cfg.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            arr = unpermute_rotary(arr, cfg.num_kv_heads)
        out[name] = arr
    return out


def _read(gguf_path: str) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, int], int]:
    """(architecture, HF tensors, token ids, number of tokens) of a GGUF file; errors are
    `GGUFError`s naming it."""
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # the reader raises ValueError/struct errors/... for a bad file
        raise GGUFError(f"corrupt GGUF file {gguf_path}: {one_line(e)}") from e
    try:
        shapes = {}
        for tensor in reader.tensors:
            shapes[hf_tensor_name(tensor.name)] = tuple(int(d) for d in reversed(tensor.shape))
        cfg = _config(reader, shapes)
        tensors = read_gguf_weights(reader, cfg)
    except ValueError as e:
        raise GGUFError(f"{gguf_path}: {one_line(e)}") from e
    ids = {hf: int(_field(reader, k)) for k, hf in _TOKEN_ID_KEYS.items() if k in reader.fields}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError(f"{gguf_path}: no tokenizer (metadata key 'tokenizer.ggml.tokens')")
    return cfg, tensors, ids, len(tokens.data)


def _tokenizer(gguf_path: str, n_tokens: int) -> tuple[Any, list[int]]:
    """(transformers' tokenizer of the file, ids of tokens it added past the file's `n_tokens`).

    transformers builds a byte-level (gpt2) GGUF tokenizer through `GPT2Tokenizer`, whose default
    unk/bos/eos `<|endoftext|>` becomes an extra token at id n_tokens when the vocabulary lacks it:
    a token with no embedding row (`hf.check_vocab` would refuse the model). Such strays are
    dropped from the written tokenizer.json, unless the tokenizer uses one as bos/eos/unk/pad.
    """
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a file it cannot read
        raise GGUFError(f"cannot build a tokenizer from {gguf_path}: {one_line(e)}") from e
    for key in LOAD_ONLY_TOKENIZER_KWARGS:  # not a setting of the tokenizer (see hf.py)
        tokenizer.init_kwargs.pop(key, None)
    stray = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if i >= n_tokens}
    for role in ("bos", "eos", "unk", "pad"):
        if getattr(tokenizer, f"{role}_token", None) in stray.values():
            raise GGUFError(
                f"{gguf_path}: transformers made {getattr(tokenizer, f'{role}_token')!r} the "
                f"{role} token, which is not among the file's {n_tokens} tokens "
                f"(tokenizer.ggml.*_token_id metadata missing?)"
            )
    return tokenizer, sorted(stray)


def _drop_added_tokens(folder: str, ids: list[int]) -> None:
    file = os.path.join(folder, TOKENIZER_FILE)
    data = read_json(file)
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] not in ids]
    write_json(file, data)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Writes an HF folder (config.json, float32 model.safetensors, generation_config.json,
    tokenizer with its chat template) from a llama-family GGUF file; returns its absolute path.

    Quantized tensors are dequantized, so the folder holds exactly the numbers llama.cpp computes
    with. Atomic like `hf.export_pretrained`: a crash leaves the old `out_dir` or the new one.
    A tensor type `gguf` cannot dequantize, an unsupported architecture or a missing metadata key
    is a one-line `GGUFError` naming the file (and the tensor).
    """
    gguf_path = os.path.expanduser(os.fspath(gguf_path))
    if not os.path.isfile(gguf_path):
        raise GGUFError(f"GGUF file not found: {gguf_path}")
    cfg, tensors, ids, n_tokens = _read(gguf_path)
    tokenizer, stray = _tokenizer(gguf_path, n_tokens)

    def write(folder: str) -> None:
        # "format": "pt" is what transformers itself writes and checks for.
        entries = {name: (t.shape, t.dtype) for name, t in tensors.items()}
        write_safetensors(
            os.path.join(folder, WEIGHTS_FILE), entries, tensors.__getitem__, {"format": "pt"}
        )
        write_json(os.path.join(folder, CONFIG_FILE), {**config_to_hf(cfg), **ids})
        write_json(os.path.join(folder, GENERATION_CONFIG_FILE), ids)
        tokenizer.save_pretrained(folder)
        if stray:
            _drop_added_tokens(folder, stray)

    return write_folder_atomically(out_dir, write)
