"""`numerics.scan_layers`: the blocks as one `lax.scan` over stacked parameters.

The reference is always the unrolled model with the same weights (itself tested against HF in
test_hf.py): logits, per-layer hidden states, KV-cache sampling, gradients with and without remat,
HF folders (per-layer tensors on disk either way), and sharding of the stacked leading axis.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from ctxjax import hf, sampling, sharding
from ctxjax.base import base_key
from ctxjax.config import load_config
from ctxjax.model import (
    ModelConfig,
    Numerics,
    Transformer,
    create_model,
    init_cache,
    unrolled_params,
    unrolled_shapes,
    with_numerics,
)
from tests.hf_fixtures import hf_logits, make_tiny_hf
from tests.test_model import BASE, _model, _tokens

SCAN = Numerics(scan_layers=True)
B, L = 3, 12


def _pair(num_layers=3, numerics=None, **overrides):
    """(unrolled, scanned) models with the same random weights, every optional piece on."""
    numerics = numerics or Numerics()
    unrolled = _model(numerics=numerics, num_layers=num_layers, **overrides)
    scanned = with_numerics(unrolled, dataclasses.replace(numerics, scan_layers=True))
    return unrolled, scanned


def _assert_same_tree(a, b, atol=0.0):
    flat_a, flat_b = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
    assert flat_a.keys() == flat_b.keys()
    for path, x in flat_a.items():
        np.testing.assert_allclose(flat_b[path][...], x[...], atol=atol, rtol=0, err_msg=str(path))


def test_parameters_are_stacked_and_a_seed_gives_the_same_weights():
    cfg = ModelConfig(**{**BASE, "num_layers": 3})
    unrolled, scanned = create_model(cfg, seed=3), create_model(cfg, seed=3, numerics=SCAN)
    # One Block whose parameters carry a leading layer axis, no per-layer modules.
    assert scanned.layers.mlp.up_proj.kernel.shape == (
        3,
        *unrolled.layers[0].mlp.up_proj.kernel.shape,
    )
    ref, got = unrolled_params(unrolled), unrolled_params(scanned)
    assert got.keys() == ref.keys() and "layers.2.self_attn.q_norm.weight" in got
    for path, x in ref.items():  # the init draws the same random numbers in the same order
        np.testing.assert_array_equal(got[path], x, err_msg=path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, SCAN, rngs=nnx.Rngs(0)))
    assert unrolled_shapes(abstract) == {p: tuple(x.shape) for p, x in ref.items()}
    # and back: unstacking restores the unrolled tree exactly
    _assert_same_tree(nnx.state(with_numerics(scanned, Numerics())), nnx.state(unrolled))


@nnx.jit
def _forward(model, ids, mask):
    out = model.forward(ids, mask_BxL=mask, return_layer_hidden=True)
    return model.logits(out.hidden_BxLxD), out.layer_hidden


def test_logits_and_layer_hidden_states_equal_the_unrolled_model():
    unrolled, scanned = _pair()
    ids = jnp.asarray(_tokens(20, B, L))
    mask = jnp.asarray(np.arange(L)[None, :] >= np.array([[0], [3], [7]]))  # left padding
    logits_u, hidden_u = _forward(unrolled, ids, mask)
    logits_s, hidden_s = _forward(scanned, ids, mask)
    np.testing.assert_allclose(logits_s, logits_u, atol=1e-6, rtol=0)
    assert isinstance(hidden_s, tuple) and len(hidden_s) == len(hidden_u) == 4  # embeddings + 3
    for h_s, h_u in zip(hidden_s, hidden_u, strict=True):
        np.testing.assert_allclose(h_s, h_u, atol=1e-6, rtol=0)
    assert scanned.forward(ids).layer_hidden is None  # only on request, as unrolled


@pytest.mark.parametrize("scan", [False, True])
def test_layer_hidden_at_slots_is_the_whole_stream_gathered(scan):
    """`layer_hidden_slots_BxN` keeps each layer's stream only at those slots (what the evaluation's
    layer cosine reads): the same numbers as gathering the whole streams afterwards."""
    unrolled, scanned = _pair(num_layers=4)
    model = scanned if scan else unrolled
    ids = jnp.asarray(_tokens(21, B, L))
    mask = jnp.asarray(np.arange(L)[None, :] >= np.array([[0], [3], [7]]))
    slots = jnp.asarray([[9, 10, 11], [11, 11, 11], [8, 11, 10]], jnp.int32)

    def at_slots(model, ids, mask, slots):
        out = model.forward(
            ids, mask_BxL=mask, return_layer_hidden=True, layer_hidden_slots_BxN=slots
        )
        return jnp.stack(out.layer_hidden)

    def whole_then_gathered(model, ids, mask, slots):
        out = model.forward(ids, mask_BxL=mask, return_layer_hidden=True)
        return jnp.stack(
            [jnp.take_along_axis(h, slots[:, :, None], axis=1) for h in out.layer_hidden]
        )

    got = nnx.jit(at_slots)(model, ids, mask, slots)
    assert got.shape == (5, B, 3, model.cfg.hidden_size)
    np.testing.assert_array_equal(got, nnx.jit(whole_then_gathered)(model, ids, mask, slots))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_sampling_equals_the_unrolled_model(temperature):
    unrolled, scanned = _pair()
    prompts = [list(_tokens(21, 5)), list(_tokens(22, 9)), list(_tokens(23, 2))]
    kwargs = dict(max_new_tokens=7, temperature=temperature, eos_ids=(), seed=5)
    ref = sampling.generate(unrolled, prompts, **kwargs)
    got = sampling.generate(scanned, prompts, **kwargs)
    np.testing.assert_array_equal(got.tokens_BxN, ref.tokens_BxN)
    np.testing.assert_allclose(got.logprobs_BxN, ref.logprobs_BxN, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.mask_BxN, ref.mask_BxN)


def test_cache_layout_follows_the_numerics():
    unrolled, scanned = _pair(num_layers=2)
    stacked = scanned.init_cache(2, 8)
    assert stacked.k.shape == (2, 2, BASE["num_kv_heads"], 8, BASE["head_dim"])
    assert isinstance(unrolled.init_cache(2, 8).k, tuple)
    ids = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"scan_layers=True.*model\.init_cache"):
        scanned.forward(ids, cache=init_cache(scanned.cfg, 2, 8))
    with pytest.raises(ValueError, match=r"scan_layers=False.*model\.init_cache"):
        unrolled.forward(ids, cache=stacked)


@nnx.jit
def _loss_grads(model, ids):
    def loss(model):
        logp = jax.nn.log_softmax(model(ids[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

    return nnx.value_and_grad(loss)(model)


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_equal_the_unrolled_model(remat):
    unrolled, scanned = _pair(numerics=Numerics(remat=remat))
    ids = jnp.asarray(_tokens(24, B, L))
    loss_u, grads_u = _loss_grads(unrolled, ids)
    loss_s, grads_s = _loss_grads(scanned, ids)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    unstacked = with_numerics(nnx.merge(nnx.graphdef(scanned), grads_s), Numerics())
    flat_u = dict(nnx.to_flat_state(grads_u))
    for path, g in nnx.to_flat_state(nnx.state(unstacked)):
        assert np.abs(np.asarray(g[...])).max() > 0, path  # every layer gets a gradient
        np.testing.assert_allclose(g[...], flat_u[path][...], atol=1e-6, rtol=1e-5, err_msg=path)


def _two_views(model_cfg_vocab, batch=B):
    """Two left-padded views of different widths (the train step's [x | y] and [c | x | y])."""
    ids_a = jnp.asarray(_tokens(31, batch, 9))
    ids_b = jnp.asarray(_tokens(32, batch, 14))
    mask_a = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [2], [5]])[:batch])
    mask_b = jnp.asarray(np.arange(14)[None, :] >= np.array([[1], [0], [6]])[:batch])
    return [(ids_a, mask_a), (ids_b, mask_b)]


def _views_loss(model, views, together):
    """A scalar of both views' hidden states: one `forward_views` or one `forward` per view."""
    if together:
        hs = model.forward_views(views)
    else:
        hs = [model.forward(ids, mask_BxL=mask).hidden_BxLxD for ids, mask in views]
    return sum(jnp.sum(jnp.sin(h) * m[..., None]) for h, (_, m) in zip(hs, views, strict=True))


@pytest.mark.parametrize(
    "numerics",
    [Numerics(), Numerics(remat=True), SCAN, Numerics(scan_layers=True, remat=True)],
    ids=["plain", "remat", "scan", "scan_remat"],
)
def test_forward_views_is_forward_view_by_view_with_one_stacked_gradient(numerics):
    """`forward_views` (the student's two views in one pass over the layers): each view's hidden
    states bitwise `forward`'s, the same gradients, and with the layer scan a smaller compiled
    backward (one stacked parameter gradient instead of one per view)."""
    unrolled, _ = _pair(num_layers=4)
    model = with_numerics(unrolled, numerics)
    views = _two_views(model.cfg.vocab_size)
    together = nnx.jit(lambda m, v: m.forward_views(v))(model, views)
    for h, (ids, mask) in zip(together, views, strict=True):
        ref = nnx.jit(lambda m, i, k: m.forward(i, mask_BxL=k).hidden_BxLxD)(model, ids, mask)
        np.testing.assert_array_equal(h, ref)

    def grads(together):
        fn = nnx.jit(lambda m, v: nnx.value_and_grad(lambda m: _views_loss(m, v, together))(m))
        return fn, fn(model, views)

    fn_t, (loss_t, g_t) = grads(True)
    fn_s, (loss_s, g_s) = grads(False)
    np.testing.assert_allclose(loss_t, loss_s, rtol=1e-6)
    _assert_same_tree(g_t, g_s, atol=1e-6)
    if numerics.scan_layers:
        temp = {
            name: fn.lower(model, views).compile().memory_analysis().temp_size_in_bytes
            for name, fn in (("together", fn_t), ("separate", fn_s))
        }
        stacked = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(model.layers)))
        # Measured: 70% of the stacked parameters' bytes less on SmolLM2-135M's step, about half
        # here (the tiny model's temporaries are mostly other things).
        assert temp["together"] <= temp["separate"] - stacked // 3, temp


def test_remat_scan_inside_grad_of_a_merged_model():
    """The train step's pattern (see test_model): the student merged inside `jax.grad`, a frozen
    teacher merged from outer-trace params; scan and remat must both be in the program and give
    the unrolled model's gradients."""
    cfg = ModelConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 40, (2, 6)))
    grads = {}
    for scan in (False, True):
        model = create_model(cfg, seed=0, numerics=Numerics(remat=True, scan_layers=scan))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, frozen, graphdef=graphdef):
            teacher = nnx.merge(graphdef, frozen)
            return (nnx.merge(graphdef, p, copy=True)(ids) * teacher(ids)).sum()

        grad_fn = jax.jit(lambda p, frozen, loss=loss: jax.grad(loss)(p, frozen))
        jaxpr = str(jax.make_jaxpr(grad_fn)(params, params))
        assert "checkpoint" in jaxpr or "remat" in jaxpr
        assert ("scan" in jaxpr) == scan
        grads[scan] = nnx.merge(graphdef, grad_fn(params, params))
    ref = unrolled_params(grads[False])
    for path, g in unrolled_params(grads[True]).items():
        np.testing.assert_allclose(g, ref[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_hf_round_trip_keeps_per_layer_tensors(tmp_path):
    """HF checkpoint -> stacked model (logits vs transformers) -> save -> the same tensors."""
    source = make_tiny_hf("qwen3", tmp_path / "hf", tie=False, num_hidden_layers=3)
    scanned = hf.load_model(source, SCAN)
    assert scanned.layers.mlp.up_proj.kernel.shape[0] == 3
    ids = _tokens(26, B, L) % 128
    mask = np.arange(L)[None, :] >= np.array([[0], [4], [9]])
    logits = np.asarray(_forward(scanned, jnp.asarray(ids), jnp.asarray(mask))[0])
    ref = hf_logits(source, ids, mask)
    np.testing.assert_allclose(logits[mask], ref[mask], atol=1e-4, rtol=0)
    _assert_same_tree(
        nnx.state(with_numerics(scanned, Numerics())), nnx.state(hf.load_model(source))
    )
    hf.save_model(scanned, tmp_path / "saved")
    original = load_file(tmp_path / "hf" / hf.WEIGHTS_FILE)
    saved = load_file(tmp_path / "saved" / hf.WEIGHTS_FILE)
    assert saved.keys() == original.keys() and "model.layers.2.mlp.down_proj.weight" in saved
    for name, x in original.items():
        np.testing.assert_array_equal(saved[name], x, err_msg=name)


def test_hf_load_errors_name_the_per_layer_tensor(tmp_path):
    unrolled, _ = _pair(mlp_bias=False)  # exportable to HF qwen3
    folder = hf.save_model(unrolled, tmp_path / "m")
    tensors = load_file(tmp_path / "m" / hf.WEIGHTS_FILE)
    tensors.pop("model.layers.1.self_attn.k_norm.weight")
    save_file(tensors, tmp_path / "m" / hf.WEIGHTS_FILE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_norm\.weight <- model\.layers"):
        hf.load_model(folder, SCAN)


def test_stacked_parameters_shard_behind_an_unsplit_layer_axis():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    spec = sharding.spec_for("layers/self_attn/q_proj/kernel", (3, 32, 48), mesh)
    assert spec == P(None, "fsdp", "tensor")
    assert sharding.spec_for("layers/1/self_attn/q_proj/kernel", (32, 48), mesh) == P(
        "fsdp", "tensor"
    )
    assert sharding.spec_for("layers/mlp/down_proj/kernel", (3, 48, 32), mesh) == (
        P(None, "tensor", "fsdp")
    )
    # opt-state paths carry a prefix; norms stay replicated
    assert sharding.spec_for("opt/0/mu/layers/input_layernorm/weight", (3, 32), mesh) == (
        P(None, None)
    )
    unrolled, scanned = _pair()
    graphdef, params = nnx.split(scanned, nnx.Param)
    placed = sharding.shard_params(params, mesh)
    kernel = placed["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    ids = jnp.asarray(_tokens(25, 4, L))
    mask = jnp.ones((4, L), bool)
    logits = _forward(nnx.merge(graphdef, placed), ids, mask)[0]
    np.testing.assert_allclose(logits, _forward(unrolled, ids, mask)[0], atol=1e-5, rtol=0)


def test_run_config_exposes_scan_layers():
    cfg = load_config(None, ["numerics.scan_layers=true", "numerics.remat=true"])
    assert cfg.numerics == Numerics(remat=True, scan_layers=True)
    assert load_config(None, []).numerics.scan_layers is False


def test_scan_layers_names_no_other_base_model():
    """A layout choice with the same numbers: the cached base model is shared, its key unchanged."""
    cfg = load_config(None, [])
    args = (cfg.task.name, dict(cfg.task.options), cfg.model, cfg.base, cfg.base.seed)
    scanned = dataclasses.replace(cfg.numerics, scan_layers=True)
    assert base_key(*args, scanned) == base_key(*args, cfg.numerics)
    assert base_key(*args, dataclasses.replace(cfg.numerics, remat=True)) != base_key(*args)
