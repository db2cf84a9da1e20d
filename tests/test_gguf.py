"""GGUF -> HF folder (`ctxjax.gguf`) against transformers' own GGUF loading and the source model.

The GGUF files are written here the way llama.cpp's convert_hf_to_gguf.py writes a llama: its
tensor names, q/k rows permuted for its rotary layout (its `LlamaModel.permute`, spelled out
below), 1-D norms in F32 and the matrices F32 or quantized with `gguf.quants.quantize`, and the
tokenizer as `tokenizer.ggml.*` metadata with the chat template.
"""

import json
import os
import subprocess
import sys

import hf_fixtures as F
import numpy as np
import pytest
from safetensors.numpy import load_file

from ctxjax import hf
from ctxjax.gguf import GGUFError, convert_gguf
from ctxjax.vocab import build_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ATOL = 1e-4  # max abs logit difference, fp32 on both sides (as tests/test_hf.py)
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "what is the answer to this"] * 4
# Matrices' GGUF types: all F32, or llama.cpp's mix in SmolLM2's Q4_1 file (Q8_0 embedding,
# Q4_1 elsewhere) with Q8_0 attention here so both quantized types are covered.
QUANT_TYPES = {"f32": {}, "quant": {"token_embd": Q.Q8_0, "attn": Q.Q8_0, "ffn": Q.Q4_1}}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's `LlamaModel.permute` (n_head: kv heads for k)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_name(hf_name):
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if hf_name in top or hf_name == "lm_head.weight":
        return top.get(hf_name, "output.weight")
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_BLOCK[rest.removesuffix('.weight')]}.weight"


def _qtype(gguf_name, arr, types):
    if arr.ndim == 1:
        return Q.F32
    for key, qtype in types.items():
        if gguf_name.startswith(key) or f".{key}" in gguf_name:
            return qtype
    return Q.F32


def write_gguf(src, tokenizer, path, types, extra_tensors=()):
    """The llama GGUF llama.cpp would write for the HF folder `src` and its tokenizer;
    `extra_tensors` (GGUF name, raw array, type) are added or replace the converted ones."""
    cfg = hf.read_hf_config(src)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    # llama.cpp marks the tokenizer's added special tokens CONTROL (get_vocab_base), so also
    # `<|im_start|>`, which transformers' all_special_tokens omits.
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab]
    )
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    tensors = {}
    for name, arr in load_file(os.path.join(src, "model.safetensors")).items():
        if name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, heads)
        elif name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, kv)
        g = _gguf_name(name)
        qtype = _qtype(g, arr, types)
        tensors[g] = (arr if qtype == Q.F32 else gguf.quants.quantize(arr, qtype), qtype)
    tensors.update({name: (arr, qtype) for name, arr, qtype in extra_tensors})  # add or replace
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models(kind, tie) -> (HF source folder, GGUF file, converted folder, tokenizer), cached."""
    tokenizer = build_tokenizer(TEXTS, vocab_size=300)
    made = {}

    def make(kind, tie):
        if (kind, tie) not in made:
            root = tmp_path_factory.mktemp(f"{kind}_{'tied' if tie else 'untied'}")
            src = F.make_tiny_hf("llama", root / "hf", tie=tie, vocab_size=len(tokenizer))
            tokenizer.save_pretrained(src)
            file = write_gguf(src, tokenizer, root / "model.gguf", QUANT_TYPES[kind])
            made[kind, tie] = (src, file, convert_gguf(file, root / "converted"), tokenizer)
        return made[kind, tie]

    return make


def _transformers_state_dict(file):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(file), gguf_file=os.path.basename(file)
    )
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["f32", "quant"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_weights_equal_transformers_gguf_loading(models, kind, tie):
    src, file, out, _ = models(kind, tie)
    ours, theirs = load_file(os.path.join(out, "model.safetensors")), _transformers_state_dict(file)
    if tie:  # transformers lists the tied head under its own name too
        assert "lm_head.weight" not in ours
        theirs.pop("lm_head.weight")
    assert sorted(ours) == sorted(theirs)
    for name, arr in ours.items():
        assert arr.dtype == np.float32
        np.testing.assert_allclose(arr, theirs[name], rtol=0, atol=1e-6, err_msg=name)
    original = load_file(os.path.join(src, "model.safetensors"))
    if kind == "f32":  # nothing rounded: the source's exact numbers
        assert all(np.array_equal(ours[k], original[k]) for k in original)
    else:  # quantized: close to the source, not equal (the quantization is real)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert 0 < np.abs(ours[q] - original[q]).max() < 0.05


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match_the_source_model(models, tie):
    src, _, out, tokenizer = models("f32", tie)
    assert hf.read_hf_config(out)["tie_word_embeddings"] is tie
    ids = np.random.default_rng(0).integers(0, len(tokenizer), (2, 9))
    mask = np.ones_like(ids)
    ours = np.asarray(hf.load_model(out)(ids, attention_mask=mask))
    assert float(np.abs(ours - F.hf_logits(src, ids, mask)).max()) < ATOL


def test_permutation_is_not_a_no_op(models):
    # The q/k check above has teeth only if llama.cpp's row order differs from HF's here.
    src, _, _, _ = models("f32", True)
    q = load_file(os.path.join(src, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, 4), q)


def test_tokenizer_and_token_ids_survive(models):
    _, _, out, tokenizer = models("f32", True)
    ours = hf.load_tokenizer(out)
    assert ours.get_vocab() == tokenizer.get_vocab()
    assert ours.chat_template == tokenizer.chat_template
    assert ours.eos_token == tokenizer.eos_token == "<|im_end|>"
    assert hf.render_chat(ours, "the cat", "what is the answer") == hf.render_chat(
        tokenizer, "the cat", "what is the answer"
    )
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    assert hf.read_hf_config(out).items() >= ids.items()
    with open(os.path.join(out, hf.GENERATION_CONFIG_FILE)) as fh:
        assert json.load(fh) == ids


def test_type_gguf_cannot_dequantize_is_named(models, tmp_path):
    src, _, _, tokenizer = models("f32", True)
    size = 64 // 32 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]  # one row of 64 values in Q8_1 blocks
    extra = [("blk.0.attn_v.weight", np.zeros((32, size), np.uint8), Q.Q8_1)]
    # Q8_1 is an intermediate type llama.cpp never stores; gguf has no dequantizer for it.
    file = write_gguf(src, tokenizer, tmp_path / "m.gguf", {}, extra)
    with pytest.raises(GGUFError, match=r"m\.gguf: tensor 'blk\.0\.attn_v\.weight' has type Q8_1"):
        convert_gguf(file, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")  # nothing half-written


def test_tensor_with_no_place_is_named(models, tmp_path):
    src, _, _, tokenizer = models("f32", True)
    extra = [("blk.0.attn_q.bias", np.zeros(64, np.float32), Q.F32)]
    file = write_gguf(src, tokenizer, tmp_path / "m.gguf", {}, extra)
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.bias' has no place"):
        convert_gguf(file, tmp_path / "out")


def test_missing_gguf_package_says_pip_install(monkeypatch, tmp_path):
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when not installed
    with pytest.raises(ImportError, match="pip install gguf"):
        convert_gguf(file, tmp_path / "out")


def test_importing_ctxjax_gguf_needs_neither_torch_nor_gguf():
    code = (
        "import sys, ctxjax, ctxjax.gguf, ctxjax.hf; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'gguf', 'transformers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
