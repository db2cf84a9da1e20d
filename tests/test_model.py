"""ctxjax.model properties that need no reference implementation (HF parity lives in test_hf.py).

Each test compares two computations that must agree by construction: a row alone vs. the same row
padded inside a batch, cached decoding vs. one full pass, remat vs. no remat, and so on.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxjax.model import (
    DEFAULT_NUMERICS,
    KVCache,
    ModelConfig,
    Numerics,
    Transformer,
    Unembedding,
    init_cache,
    positions_from_mask,
    rope_inv_freq,
)

# Every optional piece on (q/k/v and o bias, MLP bias, qk-norm, untied head, head_dim != D / H,
# llama3 rope scaling), so each test covers all of them.
BASE = dict(
    family="qwen3",
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    qk_norm=True,
    tie_embeddings=False,
    rope_scaling=("llama3", 4.0, 1.0, 4.0, 16),
)


B, L = 3, 12  # one batch shape for (almost) every call, so each jitted function compiles once


@functools.cache
def _model(seed=0, numerics=DEFAULT_NUMERICS, **overrides):
    """A model with random weights everywhere (norm gains and biases too), logits O(1).

    Built abstractly and filled from numpy: no per-shape jax init kernels to compile. Cached, so
    tests share it; no test mutates it.
    """
    cfg = ModelConfig(**{**BASE, **overrides})
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, numerics, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        scale, shift = {
            "kernel": (1 / np.sqrt(var.shape[0]), 0.0),
            "embedding": (0.5, 0.0),
            "bias": (0.3, 0.0),
        }.get(path[-1], (0.3, 1.0))  # else: RMSNorm gain
        filled.append((path, var.replace(jnp.asarray(shift + scale * noise, var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, attention_mask=mask)


def _logits(model, ids, mask=None):
    mask = np.ones(np.shape(ids), bool) if mask is None else mask
    return np.asarray(_fwd(model, jnp.asarray(ids), jnp.asarray(mask)))


def _left_padded(rows, width=L, pad_seed=1):
    """Rows of token lists, left-padded with random ids (never read) to `width`; ids and mask."""
    rng = np.random.default_rng(pad_seed)
    ids = rng.integers(0, BASE["vocab_size"], (len(rows), width))
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = True
    return ids, mask


def _tokens(seed, *shape):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], shape)


def test_causal_later_tokens_never_change_earlier_logits():
    model = _model()
    ids = _tokens(0, B, L)
    base = _logits(model, ids)
    for t in (2, L - 1):
        changed = ids.copy()
        changed[0, t] = (changed[0, t] + 1) % BASE["vocab_size"]
        out = _logits(model, changed)
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(out[1:], base[1:])  # the other rows are untouched
        assert np.abs(out[0, t:] - base[0, t:]).max() > 1e-3  # and the change does show


def test_row_logits_independent_of_padding_and_batch():
    model = _model()
    rows = [list(_tokens(1, L)), list(_tokens(2, 8)), list(_tokens(3, 4))]
    # Unpadded reference: each row from slot 0 with junk after it; by causality (tested above)
    # the junk cannot reach the row's own positions.
    junk = _tokens(4, B, L)
    for i, r in enumerate(rows):
        junk[i, : len(r)] = r
    ref = _logits(model, junk)
    for order, pad_seed in (((0, 1, 2), 1), ((2, 0, 1), 2), ((1, 2, 1), 3)):
        ids, mask = _left_padded([rows[i] for i in order], pad_seed=pad_seed)
        batched = _logits(model, ids, mask)
        assert np.isfinite(batched).all()  # padding queries see no key and must stay NaN-free
        for slot, i in enumerate(order):
            n = len(rows[i])
            np.testing.assert_allclose(batched[slot, L - n :], ref[i, :n], atol=2e-5, rtol=0)


def test_positions_from_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


@nnx.jit
def _prefill(model, ids, mask, cache):
    out = model.forward(ids, mask_BxL=mask, cache=cache)
    return model.logits(out.hidden_BxLxD), out.cache


@nnx.jit
def _decode(model, tok, positions, cache):
    out = model.forward(tok, positions_BxL=positions, cache=cache)
    return model.logits(out.hidden_BxLxD), out.cache


def test_kv_cache_prefill_and_decode_equal_full_forward():
    model = _model()
    rows = [list(_tokens(5, 7)), list(_tokens(6, 4)), list(_tokens(7, 1))]
    p, steps = 7, L - 7
    prompt, prompt_mask = _left_padded(rows, width=p)
    continuation = _tokens(8, B, steps)
    full = _logits(
        model,
        np.concatenate([prompt, continuation], axis=1),
        np.concatenate([prompt_mask, np.ones((B, steps), bool)], axis=1),
    )

    cache = init_cache(model.cfg, batch=B, max_len=16)  # more slots than used: the rest stay masked
    logits, cache = _prefill(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache)
    np.testing.assert_allclose(
        np.asarray(logits)[prompt_mask], full[:, :p][prompt_mask], atol=2e-5, rtol=0
    )
    lengths = np.asarray([len(r) for r in rows])[:, None]
    for j in range(steps):
        assert int(cache.index) == p + j
        logits, cache = _decode(
            model, jnp.asarray(continuation[:, j : j + 1]), jnp.asarray(lengths + j), cache
        )
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, p + j], atol=2e-5, rtol=0)
    assert isinstance(cache, KVCache) and cache.max_len == 16
    np.testing.assert_array_equal(cache.mask_BxS[:, p + steps :], False)


@nnx.jit
def _streams(model, ids):
    """The forward's layer streams, and the same streams recomputed block by block."""
    out = model.forward(ids, return_layer_hidden=True)
    mask = jnp.ones(ids.shape, bool)
    args = (
        positions_from_mask(mask),
        rope_inv_freq(model.cfg),
        mask,
        jnp.arange(ids.shape[1]),
        None,
    )
    by_block = [
        block(x, *args)[0] for block, x in zip(model.layers, out.layer_hidden[:-1], strict=True)
    ]
    no_request = model.forward(ids).layer_hidden  # None unless asked for
    return out, by_block, model.norm(out.layer_hidden[-1]), no_request


def test_layer_hidden_streams():
    model = _model()
    ids = jnp.asarray(_tokens(9, B, L))
    out, by_block, normed, no_request = _streams(model, ids)
    hs = out.layer_hidden
    assert len(hs) == model.cfg.num_layers + 1
    np.testing.assert_array_equal(hs[0], np.asarray(model.embed_tokens.embedding[...])[ids])
    for i in range(model.cfg.num_layers):  # each stream is the previous one through its block
        np.testing.assert_allclose(by_block[i], hs[i + 1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(normed, out.hidden_BxLxD, atol=1e-6, rtol=0)
    np.testing.assert_allclose(model.logits(out.hidden_BxLxD), _logits(model, ids), atol=1e-5)
    assert no_request is None


def test_bf16_compute_keeps_fp32_logits():
    ids = _tokens(10, B, L)
    ref = _logits(_model(), ids)
    mixed = _model(
        numerics=Numerics(compute_dtype="bfloat16")
    )  # fp32 params, same values, bf16 matmuls
    assert mixed.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    logits = _fwd(mixed, jnp.asarray(ids), jnp.ones((B, L), bool))
    assert logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - ref).max()
    assert 1e-4 < err < 0.1 * np.abs(ref).max()  # bf16 really used, and still close

    pure = _model(numerics=Numerics(param_dtype="bfloat16", compute_dtype="bfloat16"))
    assert pure.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    logits = _fwd(pure, jnp.asarray(ids), jnp.ones((B, L), bool))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@nnx.jit
def _logits_loss_grads(model, ids):
    def loss(model):
        logits = model(ids[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean(), logits

    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, value, grads


def test_remat_gives_identical_logits_and_gradients():
    ids = jnp.asarray(_tokens(11, B, L))
    plain, remat = _model(), _model(numerics=Numerics(remat=True))
    assert remat.numerics.remat and not plain.numerics.remat
    logits_p, loss_p, grads_p = _logits_loss_grads(plain, ids)
    logits_r, loss_r, grads_r = _logits_loss_grads(remat, ids)
    np.testing.assert_array_equal(logits_r, logits_p)
    np.testing.assert_allclose(loss_r, loss_p, rtol=1e-6)
    flat_p = dict(nnx.to_flat_state(grads_p))
    flat_r = dict(nnx.to_flat_state(grads_r))
    assert flat_p.keys() == flat_r.keys()
    for path, g in flat_p.items():
        assert np.abs(np.asarray(g[...])).max() > 0, path  # every parameter gets a gradient
        np.testing.assert_allclose(
            flat_r[path][...], g[...], atol=1e-6, rtol=1e-5, err_msg=str(path)
        )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(family="gpt2"), "model.family"),
        (dict(vocab_size=0), "model.vocab_size"),
        (dict(hidden_size=0), "model.hidden_size"),
        (dict(intermediate_size=-1), "model.intermediate_size"),
        (dict(num_layers=0), "model.num_layers"),
        (dict(num_heads=0), "model.num_heads"),
        (dict(num_kv_heads=0), "model.num_kv_heads"),
        (dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads"),
        (dict(hidden_size=30, head_dim=None), "model.hidden_size"),
        (dict(head_dim=7), "head.dim"),  # model.py says "head dim must be even", not model.head_dim
    ],
)
def test_config_range_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**BASE, **overrides})


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(param_dtype="int8"), "numerics.param_dtype"),
        (dict(compute_dtype="fp8"), "numerics.compute_dtype"),
    ],
)
def test_numerics_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        Numerics(**overrides)


def test_unknown_rope_scaling_is_an_error():
    cfg = ModelConfig(**{**BASE, "rope_scaling": ("yarn", 4.0, 1.0, 4.0, 16)})
    with pytest.raises(ValueError, match=r"'yarn'.*'llama3'"):
        rope_inv_freq(cfg)


def test_remat_inside_grad_of_a_merged_model_matches_plain():
    """The train step's pattern: inside `jax.jit`, a `jax.grad` whose loss also runs a model merged
    from outer-trace (non-differentiated) params, like the teacher. `nnx.remat` raised
    TraceContextError there; the model must rematerialize and give the same gradients."""
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 40, (2, 6)))
    grads = []
    for remat in (False, True):
        model = Transformer(cfg, Numerics(remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p, frozen, graphdef=graphdef):
            teacher = nnx.merge(graphdef, frozen)
            return (nnx.merge(graphdef, p, copy=True)(ids) * teacher(ids)).sum()

        grad_fn = jax.jit(lambda p, frozen: jax.grad(loss)(p, frozen))
        jaxpr = str(jax.make_jaxpr(grad_fn)(params, params))
        assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat
        grads.append(grad_fn(params, params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_block_backward_contracts_one_axis_per_weight_gradient():
    """The projections run on a 2-D [B*L, D] view, so each weight gradient of a block is a plain
    [Din, B*L] x [B*L, Dout] GEMM. On [B, L, D] it contracted two axes, which XLA CPU lowered with a
    transposed copy of the activations before each dot (~26% of the 42M fwd+bwd's CPU time)."""
    model = _model()
    block_def, block_state = nnx.split(model.layers[0])
    x_BxLxD = jnp.ones((B, L, model.cfg.hidden_size))
    positions_BxL = positions_from_mask(jnp.ones((B, L), bool))
    args = (positions_BxL, rope_inv_freq(model.cfg), jnp.ones((B, L), bool), jnp.arange(L))

    def loss(state):
        out_BxLxD, _ = nnx.merge(block_def, state, copy=True)(x_BxLxD, *args, None)
        return jnp.sum(out_BxLxD**2)

    hlo = jax.jit(jax.grad(loss)).lower(block_state).as_text()
    # Unbatched dots only: the attention einsums' batched dots over heads are another matter.
    unbatched = [
        line for line in hlo.splitlines() if "dot_general" in line and "batching_dims" not in line
    ]
    assert len(unbatched) == 3 * 7  # forward, input gradient, weight gradient of 7 projections
    two_axis = [line for line in unbatched if re.search(r"contracting_dims = \[\d+, \d+\]", line)]
    assert not two_axis, two_axis[0]


@pytest.mark.parametrize("tied", [True, False])
def test_logits_contract_the_output_projection_where_it_lies(tied):
    """The logits against numpy for a tied table [V, D] and an untied lm_head [D, V], and the
    tied table's gradient straight out of one dot: through the transposed table the gradient was
    computed as [D, V] and transposed back into the table's layout."""
    model = _model(tie_embeddings=tied)
    u = model.unembedding()
    assert u.vocab_major == tied
    d, v = model.cfg.hidden_size, model.cfg.vocab_size
    assert u.w.shape == ((v, d) if tied else (d, v))
    h_BxLxD = np.random.default_rng(0).normal(size=(B, L, d)).astype(np.float32)
    w_DxV = np.asarray(u.w, np.float64).T if tied else np.asarray(u.w, np.float64)
    want_BxLxV = h_BxLxD.astype(np.float64) @ w_DxV
    logits = model.logits(jnp.asarray(h_BxLxD))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), want_BxLxV, rtol=1e-5, atol=1e-5)

    def loss(w):
        return jnp.sum(Unembedding(w, u.vocab_major).logits(jnp.asarray(h_BxLxD)) ** 2)

    grad = np.asarray(jax.grad(loss)(u.w), np.float64)
    want_grad_DxV = np.einsum("bld,blv->dv", h_BxLxD.astype(np.float64), 2 * want_BxLxV)
    np.testing.assert_allclose(
        grad, want_grad_DxV.T if tied else want_grad_DxV, rtol=1e-4, atol=1e-5
    )
    if tied:
        assert "transpose" not in jax.jit(jax.grad(loss)).lower(u.w).as_text()
