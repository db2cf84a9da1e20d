"""HF folders in and out: an export that `generate` uses like its source, chat rendering exactly as
the template does it, one-line errors for folders that cannot be loaded, vocabulary checks.

Tiny models and tokenizers are built here (tests/hf_fixtures.py, ctxjax.vocab); no downloads.
"""

import json
import os
import shutil

import hf_fixtures as F
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from ctxjax import hf
from ctxjax.model import ModelConfig
from ctxjax.vocab import CHAT_TEMPLATE, IM_END, IM_START, PAD_TOKEN, build_tokenizer

TEXTS = ["max 3 1 4", "seq 2 7 1", "be careful and exact", "reverse the sequence"]
PROMPT = "max 3 1 4"
MAX_NEW = 12


def _json(*parts):
    with open(os.path.join(*parts)) as fh:
        return json.load(fh)


def _bytes(file):
    with open(file, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEXTS, vocab_size=300).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return hf.load_tokenizer(tok_dir)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _greedy(model, ids, steps):
    """Greedy tokens by full forward passes, no EOS: an independent reference for `generate`."""
    seq = list(ids)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids) :]


@torch.no_grad()
def _make_stop_at_eos(model, prompt_ids, eos):
    """Swaps two rows of the (untied) head so greedy decoding emits `eos` at a step k >= 2.

    Swapping head rows a and b swaps exactly logits a and b; picking a = the greedy token at step k,
    new at k and with no EOS before, leaves steps < k unchanged and makes step k the EOS. Returns k.
    """
    tokens = _greedy(model, prompt_ids, MAX_NEW)
    for k in range(1, MAX_NEW // 2):
        if tokens[k] not in tokens[:k] and eos not in tokens[: k + 1]:
            head = model.lm_head.weight
            head[[tokens[k], eos]] = head[[eos, tokens[k]]].clone()
            return k
    raise AssertionError(f"no usable step in greedy tokens {tokens}")


def _source(tmp_path, tok, tok_dir, *, ids_in_source):
    """A tiny HF chat model folder whose greedy answer to PROMPT ends with the chat EOS.

    `ids_in_source`: config.json and generation_config.json carry the EOS (and a pad id that is not
    the tokenizer's, to see precedence); otherwise neither file has ids and they come from the
    tokenizer.
    """
    eos = tok.convert_tokens_to_ids(IM_END)
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if ids_in_source:
        ids.update(eos_token_id=eos, pad_token_id=eos)
    cfg = F.tiny_hf_config("llama", tie=False, vocab_size=len(tok), **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    F.randomize_(model, 0)
    step = _make_stop_at_eos(model.eval(), hf.render_chat(tok, "", PROMPT), eos)
    path = str(tmp_path / "source")
    model.save_pretrained(path)
    if ids_in_source:  # a field the export must carry over from the source
        gen = _json(path, hf.GENERATION_CONFIG_FILE)
        with open(os.path.join(path, hf.GENERATION_CONFIG_FILE), "w") as fh:
            json.dump({**gen, "eos_token_id": eos, "max_length": 77}, fh)
    else:
        os.remove(os.path.join(path, hf.GENERATION_CONFIG_FILE))
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    return path, step


@torch.no_grad()
def _generate(path, prompt_ids, **kwargs):
    model = F.load_hf(path)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False, **kwargs
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("ids_in_source", [True, False], ids=["source-ids", "tokenizer-ids"])
def test_exported_folder_stops_at_eos_like_source(tmp_path, tok, tok_dir, ids_in_source):
    src, step = _source(tmp_path, tok, tok_dir, ids_in_source=ids_in_source)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompt_ids = hf.render_chat(tok, "", PROMPT)
    out = hf.export_pretrained(
        hf.load_model(src), hf.load_tokenizer(src), tmp_path / "final", source=src
    )

    want = _generate(src, prompt_ids, eos_token_id=eos, pad_token_id=pad)
    assert len(want) == step + 1 and want[-1] == eos  # the source stops at the chat EOS
    assert _generate(out, prompt_ids) == want  # plain generate(), no ids passed

    cfg = _json(out, hf.CONFIG_FILE)
    gen = _json(out, hf.GENERATION_CONFIG_FILE)
    if ids_in_source:  # the source's ids win over the tokenizer's pad
        assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (eos, eos)
        assert gen["max_length"] == 77 and gen["eos_token_id"] == eos
    else:
        assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (eos, pad)
        assert (gen["eos_token_id"], gen["pad_token_id"]) == (eos, pad)
    assert "bos_token_id" not in cfg  # this tokenizer has no BOS

    # The weights-only folder (what save_model writes) runs past the EOS: the ids are what stop it.
    plain = hf.save_model(hf.load_model(src), tmp_path / "plain")
    assert len(_generate(plain, prompt_ids)) == MAX_NEW


def test_exported_tokenizer_is_the_same_and_keeps_no_load_options(tmp_path, tok, tok_dir):
    path = tmp_path / "m"
    F.make_tiny_hf("llama", path, vocab_size=len(tok))
    out = hf.export_pretrained(hf.load_model(path), tok, tmp_path / "final")
    tok_cfg = _json(out, "tokenizer_config.json")
    assert "local_files_only" not in tok_cfg
    again = hf.load_tokenizer(out)
    hf.check_same_tokenizer(tok, again)
    assert again.chat_template == tok.chat_template == CHAT_TEMPLATE


def _snapshot(folder):
    return {name: _bytes(os.path.join(folder, name)) for name in os.listdir(folder)}


def test_export_is_atomic(tmp_path, tok, monkeypatch):
    src = F.make_tiny_hf("llama", tmp_path / "src", vocab_size=len(tok))
    model = hf.load_model(src)
    final = hf.export_pretrained(model, tok, tmp_path / "out" / "final", source=src)
    with open(os.path.join(final, "stale.txt"), "w") as fh:
        fh.write("from the old export")
    before = _snapshot(final)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    # A crash after the weights were written, while the tokenizer is saved: old folder intact.
    with monkeypatch.context() as m:
        m.setattr(type(tok), "save_pretrained", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            hf.export_pretrained(model, tok, final, source=src)
    assert _snapshot(final) == before
    assert os.listdir(tmp_path / "out") == ["final"]  # no temporary folder left behind

    # A crash while the new folder is renamed in: the old one is put back.
    real_rename = os.rename

    def rename(a, b):
        if os.path.basename(a).startswith(".final.tmp-"):
            raise OSError("rename failed")
        real_rename(a, b)

    with monkeypatch.context() as m:
        m.setattr(hf.os, "rename", rename)
        with pytest.raises(OSError, match="rename failed"):
            hf.export_pretrained(model, tok, final, source=src)
    assert _snapshot(final) == before
    assert os.listdir(tmp_path / "out") == ["final"]

    # A complete export replaces the old folder as a whole: the stale file is gone.
    hf.export_pretrained(model, tok, final, source=src, dtype="bfloat16")
    assert "stale.txt" not in os.listdir(final)
    assert _json(final, hf.CONFIG_FILE)["dtype"] == "bfloat16"
    assert os.listdir(tmp_path / "out") == ["final"]


# --------------------------------------------------------------------------------------------------
# Chat rendering
# --------------------------------------------------------------------------------------------------

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# SmolLM2-style: ChatML with a default system prompt when the messages have none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}" + CHAT_TEMPLATE
)
# Gemma-style: no system role at all.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _turn(role, content):
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def _with_template(tok_dir, template):
    tokenizer = hf.load_tokenizer(tok_dir)
    tokenizer.chat_template = template
    return tokenizer


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("context", ["", "Be brief."])
@pytest.mark.parametrize("default_system", [True, False], ids=["default-system", "plain"])
def test_render_chat_is_what_the_template_renders(tok_dir, context, default_system):
    tokenizer = _with_template(
        tok_dir, DEFAULT_SYSTEM_TEMPLATE if default_system else CHAT_TEMPLATE
    )
    system = context or (DEFAULT_SYSTEM if default_system else "")
    text = (_turn("system", system) if system else "") + _turn("user", PROMPT)
    text += f"{IM_START}assistant\n"
    ids = hf.render_chat(tokenizer, context, PROMPT)
    assert ids == _encode(tokenizer, text)  # hand-written reference of the template's output
    messages = ([{"role": "system", "content": context}] if context else []) + [
        {"role": "user", "content": PROMPT}
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == _encode(tokenizer, rendered)


def test_render_chat_user_placement(tok_dir):
    tokenizer = _with_template(tok_dir, NO_SYSTEM_TEMPLATE)
    with pytest.raises(Exception, match="System role not supported"):
        hf.render_chat(tokenizer, "Be brief.", PROMPT)
    for context, content in [("Be brief.", "Be brief.\n\n" + PROMPT), ("", PROMPT)]:
        text = f"<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
        assert hf.render_chat(tokenizer, context, PROMPT, placement="user") == _encode(
            tokenizer, text
        )
    chatml = _with_template(tok_dir, DEFAULT_SYSTEM_TEMPLATE)  # the default system prompt stays
    want = _turn("system", DEFAULT_SYSTEM) + _turn("user", "Be brief.\n\n" + PROMPT)
    got = hf.render_chat(chatml, "Be brief.", PROMPT, placement="user")
    assert got == _encode(chatml, want + f"{IM_START}assistant\n")
    with pytest.raises(ValueError, match="placement must be one of \\('system', 'user'\\)"):
        hf.render_chat(chatml, "", PROMPT, placement="prefix")


# --------------------------------------------------------------------------------------------------
# Loading errors: one line, naming the path or tensor
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return F.make_tiny_hf("llama", tmp_path_factory.mktemp("llama") / "m", tie=False)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _one_line_error(kind, match, fn, *args):
    with pytest.raises(kind, match=match) as err:
        fn(*args)
    assert isinstance(err.value, hf.HFFolderError)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_home_is_expanded(model_dir, tok_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _copy(model_dir, tmp_path / "m")
    _copy(tok_dir, tmp_path / "t")
    model = hf.load_model("~/m")
    assert model.cfg.vocab_size == F.TINY["vocab_size"]
    assert len(hf.load_tokenizer("~/t")) == len(hf.load_tokenizer(tok_dir))
    _one_line_error(
        FileNotFoundError, f"not found: {tmp_path}/nowhere$", hf.load_model, "~/nowhere"
    )


def test_file_instead_of_folder(model_dir):
    file = os.path.join(model_dir, hf.CONFIG_FILE)
    for fn, what in [(hf.load_model, "model"), (hf.load_tokenizer, "tokenizer")]:
        _one_line_error(FileNotFoundError, f"{what} path is a file, not a folder: {file}", fn, file)


def test_missing_config_weights_or_tokenizer(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path / "m")
    _one_line_error(ValueError, f"cannot load a tokenizer from {folder}", hf.load_tokenizer, folder)
    os.remove(os.path.join(folder, hf.WEIGHTS_FILE))
    _one_line_error(
        FileNotFoundError, f"no model.safetensors .* in {folder}", hf.load_model, folder
    )
    os.remove(os.path.join(folder, hf.CONFIG_FILE))
    _one_line_error(FileNotFoundError, f"config.json not found in {folder}", hf.load_model, folder)


@pytest.mark.parametrize("damage", ["bad-header", "header-length", "truncated-data"])
def test_corrupt_safetensors_is_one_line(model_dir, tmp_path, damage):
    folder = _copy(model_dir, tmp_path / "m")
    file = os.path.join(folder, hf.WEIGHTS_FILE)
    data = _bytes(file)
    data = {
        "bad-header": data[:8] + b"{not json" + data[17:],
        "header-length": (10**12).to_bytes(8, "little") + data[8:],
        "truncated-data": data[:-4],
    }[damage]
    with open(file, "wb") as fh:
        fh.write(data)
    _one_line_error(ValueError, f"corrupt safetensors file {file}", hf.load_model, folder)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_name_the_tensor(tmp_path, dtype, bad):
    folder = F.make_tiny_hf("llama", tmp_path / "m", dtype=dtype)
    file = os.path.join(folder, hf.WEIGHTS_FILE)
    tensors = load_file(file) if dtype == "float32" else None
    if tensors is None:  # numpy cannot hold bf16 from safetensors.numpy: poison via torch
        from safetensors.torch import load_file as load_torch
        from safetensors.torch import save_file as save_torch

        tensors = load_torch(file)
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float(bad)
        save_torch(tensors, file, metadata={"format": "pt"})
    else:
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
        save_file(tensors, file, metadata={"format": "pt"})
    _one_line_error(
        ValueError,
        r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' in .*model\.safetensors holds 1 NaN/inf",
        hf.load_model,
        folder,
    )


# --------------------------------------------------------------------------------------------------
# Vocabulary checks
# --------------------------------------------------------------------------------------------------


def test_check_vocab(tok):
    n = len(tok)
    hf.check_vocab(tok, ModelConfig(vocab_size=n), "student")
    hf.check_vocab(tok, ModelConfig(vocab_size=n + 64), "student")  # padded vocab: fine
    with pytest.raises(ValueError, match=f"teacher: the tokenizer has {n} tokens .* is {n - 1}"):
        hf.check_vocab(tok, ModelConfig(vocab_size=n - 1), "teacher")


def test_check_same_tokenizer(tok, tok_dir):
    hf.check_same_tokenizer(tok, hf.load_tokenizer(tok_dir))
    other = build_tokenizer([*TEXTS, "a different corpus entirely"], vocab_size=300)
    with pytest.raises(ValueError, match="tokens have different ids"):
        hf.check_same_tokenizer(tok, other)
    extra = hf.load_tokenizer(tok_dir)
    extra.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    with pytest.raises(ValueError, match=r"'<\|tool\|>': None vs"):
        hf.check_same_tokenizer(tok, extra)
    other_eos = hf.load_tokenizer(tok_dir)
    other_eos.eos_token = PAD_TOKEN  # same vocabulary, another EOS
    with pytest.raises(
        ValueError, match=r"special tokens: eos_token '<\|im_end\|>' vs '<\|pad\|>'"
    ):
        hf.check_same_tokenizer(tok, other_eos)


def test_a_config_lacking_a_key_is_one_line_naming_the_file(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path / "m")
    config = os.path.join(folder, "config.json")
    with open(config) as f:
        cfg = json.load(f)
    del cfg["hidden_size"]
    with open(config, "w") as f:
        json.dump(cfg, f)
    message = _one_line_error(ValueError, "hidden_size", hf.read_architecture, folder)
    assert message.startswith(config)
    _one_line_error(ValueError, "hidden_size", hf.load_model, folder)


def test_streaming_safetensors_writer_reads_back_with_safetensors(tmp_path):
    """`hf.write_safetensors` (one tensor on the host at a time) against the safetensors library's
    own reader: every dtype the exports use, the metadata, and each tensor fetched exactly once, in
    header order."""
    import ml_dtypes
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {
        "b.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "a.bias": rng.standard_normal((7,)).astype(np.float16),
        "c.odd": rng.standard_normal((1, 3, 1)).astype(np.float32),  # header padding is exercised
        "d.half": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
    }
    fetched = []

    def get(name):
        fetched.append(name)
        return tensors[name]

    file = str(tmp_path / "m.safetensors")
    entries = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    hf.write_safetensors(file, entries, get, {"format": "pt"})
    assert fetched == list(tensors)
    with safe_open(file, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("d.half").get_dtype() == "BF16"
    back = load_file(file)  # numpy can't name bf16: the non-bf16 tensors through the library
    for name in ("b.weight", "a.bias", "c.odd"):
        np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)
        assert back[name].dtype == tensors[name].dtype
    header, start = hf._read_header(file)
    got = hf._read_tensor(file, "d.half", header["d.half"], start)
    np.testing.assert_array_equal(got.astype(np.float32), tensors["d.half"].astype(np.float32))

    with pytest.raises(ValueError, match=r"'b\.weight' has shape"):
        hf.write_safetensors(file, {"b.weight": ((5, 3), np.float32)}, get)
