"""ctxjax.hf against transformers: logits parity on tiny random checkpoints, export, strict loading.

Levanter's pattern: tiny random HF model -> save_pretrained -> load ours -> compare logits -> export
back -> load with HF -> compare again. No network. HF logits come from torch (tests/hf_fixtures.py).
"""

import json
import os
import re
import shutil

import hf_fixtures as F
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ctxjax import hf
from ctxjax.model import ModelConfig, Numerics

ATOL = 1e-4  # max abs logit difference, fp32 on both sides

# (family, tied embeddings, config overrides): every bias / norm / head layout the loader maps.
CASES = [
    ("llama", True, {}),
    ("llama", False, {"attention_bias": True, "mlp_bias": True, "num_hidden_layers": 3}),
    ("qwen2", True, {}),
    ("qwen2", False, {}),
    ("qwen3", True, {}),
    ("qwen3", False, {"attention_bias": True}),
]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _case_id(case):
    family, tie, over = case
    return f"{family}-{'tied' if tie else 'untied'}" + ("-bias" if over else "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(family, tie=..., **overrides) -> path of a cached tiny random HF checkpoint."""
    made = {}

    def make(family, tie=True, dtype="float32", **overrides):
        key = json.dumps([family, tie, dtype, overrides], sort_keys=True)
        if key not in made:
            path = tmp_path_factory.mktemp(f"{family}_{'tied' if tie else 'untied'}")
            made[key] = F.make_tiny_hf(family, path, tie=tie, dtype=dtype, **overrides)
        return made[key]

    return make


def _padded_batch(seed=0, lengths=(11, 8, 3), vocab=128):
    """Left-padded ids and mask, rows of different lengths; the pad ids are random on purpose."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = rng.integers(0, vocab, (len(lengths), width))
    mask = np.arange(width)[None, :] >= (width - np.asarray(lengths))[:, None]
    return ids, mask.astype(np.int64)


def _max_diff(ours, ref, mask):
    """Max abs difference over real-token positions only (padding rows are unconstrained)."""
    return float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max())


def _ours(model, ids, mask):
    return np.asarray(model(ids, attention_mask=mask))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, edit):
    file = os.path.join(folder, hf.WEIGHTS_FILE)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _read_config(folder):
    with open(os.path.join(folder, hf.CONFIG_FILE)) as fh:
        return json.load(fh)


def _edit_config(folder, edit):
    file = os.path.join(folder, hf.CONFIG_FILE)
    cfg = _read_config(folder)
    edit(cfg)
    with open(file, "w") as fh:
        json.dump(cfg, fh)


# --------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_logits_match_hf_then_export_round_trip(case, ckpt, tmp_path):
    family, tie, over = case
    path = ckpt(family, tie, **over)
    ids, mask = _padded_batch()
    ref = F.hf_logits(path, ids, mask)
    assert ref[mask.astype(bool)].std() > 0.5  # random enough that a wrong weight shows

    model = hf.load_model(path)
    assert model.cfg.family == family and model.cfg.tie_embeddings == tie
    assert _max_diff(_ours(model, ids, mask), ref, mask) < ATOL

    out = hf.save_model(model, tmp_path / "export")
    assert _max_diff(F.hf_logits(out, ids, mask), ref, mask) < ATOL
    # The export is the same checkpoint, tensor for tensor (names, layout, values).
    original = load_file(os.path.join(path, hf.WEIGHTS_FILE))
    exported = load_file(os.path.join(out, hf.WEIGHTS_FILE))
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


def test_llama3_rope_scaling_matches_hf(ckpt, tmp_path):
    path = ckpt("llama", tie=False, rope_parameters=dict(LLAMA3_ROPE))
    model = hf.load_model(path)
    assert model.cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64)
    ids, mask = _padded_batch()
    ref = F.hf_logits(path, ids, mask)
    assert _max_diff(_ours(model, ids, mask), ref, mask) < ATOL

    # The scaling changes these logits, so the parity above is not vacuous.
    unscaled_dir = _copy(path, tmp_path / "unscaled")
    _edit_config(
        unscaled_dir,
        lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    )
    assert _max_diff(_ours(hf.load_model(unscaled_dir), ids, mask), ref, mask) > 1e-2

    out = hf.save_model(model, tmp_path / "export")
    assert _read_config(out)["rope_parameters"] == LLAMA3_ROPE
    assert _max_diff(F.hf_logits(out, ids, mask), ref, mask) < ATOL


def test_legacy_rope_fields_read_like_transformers():
    """Old configs: top-level rope_theta and a `rope_scaling` dict keyed `type`."""
    legacy = dict(
        F.TINY,
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    ours = hf.config_from_hf(legacy)
    assert ours.rope_theta == 500000.0
    assert ours.rope_scaling == ("llama3", 32.0, 1.0, 4.0, 64)
    via_hf = F.FAMILY_CONFIGS["llama"](**{k: v for k, v in legacy.items() if k != "model_type"})
    assert hf.config_from_hf(via_hf.to_dict()) == ours
    plain = hf.config_from_hf(dict(F.TINY, model_type="qwen2", rope_theta=1e6))
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_bf16_checkpoint_loads(ckpt, tmp_path):
    path = ckpt("qwen3", tie=False, dtype="bfloat16")
    with safe_open(os.path.join(path, hf.WEIGHTS_FILE), framework="numpy") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
    ids, mask = _padded_batch()
    ref = F.hf_logits(F.load_hf(path, "float32"), ids, mask)  # bf16 weights upcast exactly

    m32 = hf.load_model(path, param_dtype="float32")
    assert _max_diff(_ours(m32, ids, mask), ref, mask) < ATOL

    m16 = hf.load_model(path, param_dtype="bfloat16")
    assert m16.numerics.param_dtype == m16.numerics.compute_dtype == "bfloat16"
    assert hf.load_model(path, Numerics(remat=True)).numerics == Numerics(remat=True)
    with pytest.raises(ValueError, match="not both"):
        hf.load_model(path, Numerics(), param_dtype="bfloat16")
    q16 = m16.layers[0].self_attn.q_proj.kernel[...]
    assert q16.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(
        np.asarray(q16, np.float32), np.asarray(m32.layers[0].self_attn.q_proj.kernel[...])
    )

    out = hf.save_model(m32, tmp_path / "export", dtype="bfloat16")  # lossless: values are bf16
    with safe_open(os.path.join(out, hf.WEIGHTS_FILE), framework="numpy") as f:
        # safe_open has keys() but is not iterable, so SIM118's `k in f` would raise.
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert _read_config(out)["dtype"] == "bfloat16"
    assert _max_diff(F.hf_logits(F.load_hf(out, "float32"), ids, mask), ref, mask) < ATOL


def _shard(folder, names_per_shard):
    """Rewrites a single-file checkpoint as shards + index; returns the index's weight_map."""
    tensors = load_file(os.path.join(folder, hf.WEIGHTS_FILE))
    os.remove(os.path.join(folder, hf.WEIGHTS_FILE))
    weight_map, n = {}, len(names_per_shard)
    for i, names in enumerate(names_per_shard):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names}, os.path.join(folder, shard), {"format": "pt"})
        weight_map.update({k: shard for k in names})
    index = {
        "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
        "weight_map": weight_map,
    }
    with open(os.path.join(folder, hf.WEIGHTS_INDEX_FILE), "w") as fh:
        json.dump(index, fh)
    return weight_map


def test_sharded_checkpoint_loads(ckpt, tmp_path):
    path = ckpt("llama", tie=False)
    names = sorted(load_file(os.path.join(path, hf.WEIGHTS_FILE)))
    sharded = _copy(path, tmp_path / "sharded")
    _shard(sharded, [names[::2], names[1::2]])
    ids, mask = _padded_batch()
    ref = F.hf_logits(path, ids, mask)
    assert _max_diff(_ours(hf.load_model(sharded), ids, mask), ref, mask) < ATOL
    assert _max_diff(F.hf_logits(sharded, ids, mask), ref, mask) < ATOL  # a valid HF folder too

    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        hf.load_model(sharded)


def test_sharded_index_must_match_shards(ckpt, tmp_path):
    path = ckpt("llama", tie=False)
    names = sorted(load_file(os.path.join(path, hf.WEIGHTS_FILE)))
    sharded = _copy(path, tmp_path / "sharded")
    weight_map = _shard(sharded, [names[:5], names[5:]])
    weight_map[names[0]] = "model-00002-of-00002.safetensors"  # lies about where a tensor lives
    with open(os.path.join(sharded, hf.WEIGHTS_INDEX_FILE), "w") as fh:
        json.dump({"weight_map": weight_map}, fh)
    with pytest.raises(ValueError, match=names[0].replace(".", r"\.")):
        hf.load_model(sharded)
    with open(os.path.join(sharded, hf.WEIGHTS_INDEX_FILE), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="corrupt index file"):
        hf.load_model(sharded)


# --------------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, over, expected",
    [
        (
            "llama",
            {},
            dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, resolved_head_dim=16),
        ),
        (
            "llama",
            {"attention_bias": True, "mlp_bias": True},
            dict(qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=False),
        ),
        # Qwen2Attention hard-codes q/k/v bias on and o bias off; Qwen2MLP has no bias.
        (
            "qwen2",
            {},
            dict(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False, resolved_head_dim=16),
        ),
        (
            "qwen3",
            {},
            dict(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=True, resolved_head_dim=24),
        ),
        ("qwen3", {"attention_bias": True}, dict(qkv_bias=True, o_bias=True, qk_norm=True)),
    ],
)
def test_config_from_hf_follows_transformers_modeling(family, over, expected):
    hf_cfg = F.tiny_hf_config(
        family, tie=False, rms_norm_eps=1e-5, num_key_value_heads=1, **over
    ).to_dict()
    cfg = hf.config_from_hf(hf_cfg)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (128, 64, 128)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (2, 4, 1)
    assert (cfg.rms_norm_eps, cfg.tie_embeddings, cfg.rope_theta) == (1e-5, False, 10000.0)


def test_qwen3_head_dim_defaults_to_128():
    """Qwen3Config's default head_dim is 128, not hidden_size // heads."""
    hf_cfg = dict(F.TINY, model_type="qwen3")
    assert (
        hf.config_from_hf(hf_cfg).resolved_head_dim == F.FAMILY_CONFIGS["qwen3"]().head_dim == 128
    )


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(
            family="llama",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_embeddings=False,
            rope_scaling=("llama3", 8.0, 1.0, 4.0, 64),
            max_position_embeddings=256,
        ),
        ModelConfig(family="qwen2", qkv_bias=True, rope_theta=1e6, rms_norm_eps=1e-5),
        ModelConfig(family="qwen3", qk_norm=True, head_dim=24, num_kv_heads=1),
    ],
    ids=["llama", "qwen2", "qwen3"],
)
def test_config_round_trip_and_transformers_reads_it(cfg):
    hf_cfg = hf.config_to_hf(cfg)
    assert hf.config_from_hf(hf_cfg) == cfg
    via_hf = F.FAMILY_CONFIGS[cfg.family](**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    assert hf.config_from_hf(via_hf.to_dict()) == cfg


@pytest.mark.parametrize(
    "cfg, field",
    [
        (ModelConfig(family="llama", qk_norm=True), "qk_norm"),
        (ModelConfig(family="llama", qkv_bias=True), "o_bias"),
        (ModelConfig(family="qwen2"), "qkv_bias"),
        (ModelConfig(family="qwen2", qkv_bias=True, o_bias=True), "o_bias"),
        (ModelConfig(family="qwen3"), "qk_norm"),
        (ModelConfig(family="qwen3", qk_norm=True, mlp_bias=True), "mlp_bias"),
    ],
)
def test_config_to_hf_rejects_what_the_family_cannot_express(cfg, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf.config_to_hf(cfg)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="mistral"), r"'mistral'.*'llama', 'qwen2', 'qwen3'"),
        (
            lambda c: c.update(
                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
            ),
            r"'yarn'",
        ),
        (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}), r"factor"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
        (
            lambda c: c.update(
                use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None
            ),
            "sliding",
        ),
        (lambda c: c.pop("hidden_size"), "hidden_size"),
        (
            lambda c: c.update(
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.5,
                }
            ),
            "partial_rotary_factor",
        ),
    ],
)
def test_config_errors_name_the_problem(edit, message):
    hf_cfg = F.tiny_hf_config("qwen2").to_dict()
    edit(hf_cfg)
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf(hf_cfg)


def test_sliding_window_flag_without_window_is_full_attention():
    """HF drops the window when `sliding_window` is null: such a config is plain attention."""
    hf_cfg = F.tiny_hf_config("qwen2").to_dict()
    hf_cfg.update(use_sliding_window=True, sliding_window=None, layer_types=None)
    assert hf.config_from_hf(hf_cfg).family == "qwen2"


# --------------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------------


def test_unsupported_model_type_folder(ckpt, tmp_path):
    folder = _copy(ckpt("llama"), tmp_path / "m")
    _edit_config(folder, lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match=r"'gpt2'.*supported: \('llama', 'qwen2', 'qwen3'\)"):
        hf.load_model(folder)


def test_extra_tensor_is_an_error(ckpt, tmp_path):
    folder = _copy(ckpt("qwen2"), tmp_path / "m")
    _edit_weights(
        folder,
        lambda t: t.update(
            {
                "model.layers.0.mlp.extra.weight": np.zeros(3, "f4"),
                "model.layers.0.self_attn.o_proj.bias": np.zeros(64, "f4"),
            }
        ),
    )
    with pytest.raises(ValueError, match="not used") as err:
        hf.load_model(folder)
    # Both: the unknown name and the known name the config has no parameter for (qwen2: no o bias).
    assert "model.layers.0.mlp.extra.weight" in str(err.value)
    assert "model.layers.0.self_attn.o_proj.bias" in str(err.value)


def test_missing_tensor_is_an_error(ckpt, tmp_path):
    folder = _copy(ckpt("qwen3"), tmp_path / "m")
    _edit_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match="not filled") as err:
        hf.load_model(folder)
    assert "layers.1.self_attn.k_norm.weight <- model.layers.1.self_attn.k_norm.weight" in str(
        err.value
    )


def test_untied_config_needs_lm_head(ckpt, tmp_path):
    folder = _copy(ckpt("llama", tie=True), tmp_path / "m")
    _edit_config(folder, lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"lm_head\.kernel <- lm_head\.weight"):
        hf.load_model(folder)


def test_tied_config_with_untied_checkpoint_is_an_error(ckpt, tmp_path):
    folder = _copy(ckpt("llama", tie=False), tmp_path / "m")
    _edit_config(folder, lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs"):
        hf.load_model(folder)


def test_tied_checkpoint_may_carry_a_copy_of_the_head(ckpt, tmp_path):
    path = ckpt("llama", tie=True)
    folder = _copy(path, tmp_path / "m")
    _edit_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    ids, mask = _padded_batch()
    assert (
        _max_diff(_ours(hf.load_model(folder), ids, mask), F.hf_logits(path, ids, mask), mask)
        < ATOL
    )


def test_rotary_inv_freq_buffer_is_derived_not_loaded(ckpt, tmp_path):
    # Older exports carry the rotary frequencies as a tensor. A wrong one (all ones) is accepted and
    # ignored: the frequencies come from the config, so the logits still equal HF's on the clean
    # checkpoint (all-ones frequencies would rotate every pair differently and move the logits).
    path = ckpt("llama")
    folder = _copy(path, tmp_path / "m")
    _edit_weights(
        folder,
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, "f4")}),
    )
    ids, mask = _padded_batch()
    ours = _ours(hf.load_model(folder), ids, mask)
    assert _max_diff(ours, F.hf_logits(path, ids, mask), mask) < ATOL
    # The check has teeth: rope_theta = 1 makes every frequency theta^(-2i/d) = 1, the buffer's.
    ones = _copy(path, tmp_path / "ones")
    _edit_config(ones, lambda c: c["rope_parameters"].update(rope_theta=1.0))
    assert _max_diff(_ours(hf.load_model(ones), ids, mask), ours, mask) > 100 * ATOL


def test_wrong_shape_names_tensor_and_shapes(ckpt, tmp_path):
    folder = _copy(ckpt("llama"), tmp_path / "m")
    _edit_weights(
        folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((100, 64), "f4")})
    )
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*"
        r"\(100, 64\).*\(128, 64\)",
    ):
        hf.load_model(folder)


def test_missing_files_are_named(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder not found.*nowhere"):
        hf.load_model(tmp_path / "nowhere")
    folder = _copy(ckpt("llama"), tmp_path / "m")
    os.remove(os.path.join(folder, hf.WEIGHTS_FILE))
    with pytest.raises(
        FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index"
    ):
        hf.load_model(folder)
    os.remove(os.path.join(folder, hf.CONFIG_FILE))
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        hf.load_model(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_named(ckpt, tmp_path, damage):
    folder = _copy(ckpt("llama"), tmp_path / "m")
    file = os.path.join(folder, hf.WEIGHTS_FILE)
    with open(file, "rb") as fh:
        data = fh.read()
    with open(file, "wb") as fh:
        fh.write(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match=f"corrupt safetensors file {re.escape(file)}"):
        hf.load_model(folder)


def test_corrupt_config_is_named(ckpt, tmp_path):
    folder = _copy(ckpt("llama"), tmp_path / "m")
    with open(os.path.join(folder, hf.CONFIG_FILE), "w") as fh:
        fh.write("{")
    with pytest.raises(ValueError, match=r"corrupt .*config\.json"):
        hf.load_model(folder)


def test_save_rejects_unknown_dtype(ckpt, tmp_path):
    with pytest.raises(ValueError, match="save dtype"):
        hf.save_model(hf.load_model(ckpt("llama")), tmp_path / "x", dtype="int8")


def test_no_torch_on_the_load_path(ckpt, tmp_path):
    import subprocess
    import sys

    code = (
        f"import sys; from ctxjax import hf; m = hf.load_model({ckpt('qwen3')!r}); "
        f"hf.save_model(m, {str(tmp_path / 'out')!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
