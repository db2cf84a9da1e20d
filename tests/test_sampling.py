"""ctxjax.sampling against independent references: numpy formulas for the logit processing, a full
forward pass for the log-probs, HF transformers' greedy `generate` for the tokens."""

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ctxjax import sampling
from ctxjax.model import ModelConfig, Transformer, create_model
from ctxjax.sampling import SampleOutput, SamplingMethod, generate, sample

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)
PROMPTS = [[5, 17, 3], [9, 2, 44, 31, 8, 60, 12], [33], [21, 7, 7, 50, 1]]


def _sharpen(model: nnx.Module, scale: float = 10.0) -> nnx.Module:
    """Scales the weight matrices so the tiny random model has peaked, varied next-token
    distributions (the default normal(0.02) init gives near-uniform logits and near-ties)."""
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, params))
    return model


@pytest.fixture(scope="module")
def model():
    return _sharpen(create_model(CFG, seed=0))


def _left_pad(prompts, width=None, pad_id=0):
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, True
    return ids, mask


def _forward_logprobs_raw(model, prompt_ids, prompt_mask, tokens, mask):
    """log p(response token j) from one forward pass over [left-padded prompt | response], and the
    argmax at each response slot."""
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    logp = jax.nn.log_softmax(model(ids, attention_mask=full_mask), axis=-1)
    p = prompt_ids.shape[1]
    # The logits at slot p - 1 + j predict response token j (slot p + j).
    logp_resp = logp[:, p - 1 : -1]
    return (
        jnp.take_along_axis(logp_resp, tokens[..., None], axis=-1)[..., 0],
        jnp.argmax(logp_resp, axis=-1),
    )


_forward_logprobs = nnx.jit(_forward_logprobs_raw)  # eager op-by-op dispatch is slow on CPU


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "method", "eos_ids", "pad_id")
)
def _sample_jit(graphdef, state, ids, mask, rng, **kw):
    """`sample` under a plain jax.jit (shared by tests so that equal arguments compile once)."""
    return sample(nnx.merge(graphdef, state), ids, mask, rng, **kw)


# One sampling setup shared by the jit / grad tests (one compile of the plain-jit reference).
JIT_KW = dict(
    max_new_tokens=6, method=SamplingMethod(temperature=1.0, top_p=0.9), eos_ids=(6,), pad_id=0
)


# --------------------------------------------------------------------------------------------------
# SamplingMethod: validation and the processing order against numpy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_method_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingMethod(**kwargs)


def test_method_hashable_static():
    a, b = SamplingMethod(0.7, 5, 0.9), SamplingMethod(0.7, 5, 0.9)
    assert a == b and hash(a) == hash(b)
    f = jax.jit(lambda x, p: p.process_logits(x), static_argnums=1)
    np.testing.assert_allclose(f(jnp.ones((1, 4)), a), jnp.full((1, 4), 1 / 0.7), rtol=1e-6)


def np_process(logits, temperature, top_k, top_p):
    """float64 reference, written as loops: temperature, then top-k, then top-p (ties kept)."""
    x = np.asarray(logits, np.float64).copy()
    if temperature > 0:
        x = x / temperature
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        row = x[r].copy()
        if top_k is not None and top_k < row.size:
            kth = np.sort(row)[::-1][top_k - 1]
            row[row < kth] = -np.inf
        if top_p is not None and top_p < 1:
            probs = np.exp(row - row.max())
            probs /= probs.sum()
            mass, smallest_kept = 0.0, None
            for idx in np.argsort(-probs, kind="stable"):
                if mass >= top_p:
                    break
                smallest_kept = probs[idx]
                # Guard: the reference and the float32 kernel must not disagree by rounding at a
                # boundary.
                assert abs(mass - top_p) > 1e-4
                mass += probs[idx]
            row[probs < smallest_kept] = -np.inf
        out[r] = row
    return out


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [
        (1.0, None, None),
        (0.5, None, None),
        (1.0, 5, None),
        (0.7, None, 0.8),
        (0.7, 6, 0.5),
        (2.0, 12, 0.95),
        (1.3, 1, 0.5),
        (0.9, 40, 0.3),
    ],
)
def test_process_logits_matches_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 2, size=(6, 40)).astype(np.float32)
    got = np.asarray(SamplingMethod(temperature, top_k, top_p).process_logits(jnp.asarray(logits)))
    want = np_process(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5)


def test_process_logits_order_and_ties_by_hand():
    # Temperature 0.5 turns [2, 1, 1, 0, -3] into [4, 2, 2, 0, -6]; top-k 2 keeps the tie at 2
    # (three tokens); renormalized p = [e^4, e^2, e^2] / Z = [0.787, 0.106, 0.106]. top_p 0.8: the
    # mass before the second token is 0.787 < 0.8, so it is kept, and its tie (mass before 0.894) is
    # kept with it.
    logits = jnp.array([[2.0, 1.0, 1.0, 0.0, -3.0]])
    got = SamplingMethod(0.5, 2, 0.8).process_logits(logits)
    np.testing.assert_allclose(got, [[4.0, 2.0, 2.0, -np.inf, -np.inf]])
    # top_p 0.7 < 0.787: only the argmax survives.
    got = SamplingMethod(0.5, 2, 0.7).process_logits(logits)
    np.testing.assert_allclose(got, [[4.0, -np.inf, -np.inf, -np.inf, -np.inf]])
    # Without top-k, p = [0.776, 0.105, 0.105, 0.014, 0.00003]: top_p 0.9 keeps three tokens
    # (mass before the third is 0.881 < 0.9, before the fourth 0.986). top-k 1 first leaves only the
    # argmax whatever top_p says: top-k comes before top-p.
    np.testing.assert_allclose(
        SamplingMethod(0.5, None, 0.9).process_logits(logits), [[4.0, 2.0, 2.0, -np.inf, -np.inf]]
    )
    np.testing.assert_allclose(
        SamplingMethod(0.5, 1, 0.9).process_logits(logits),
        [[4.0, -np.inf, -np.inf, -np.inf, -np.inf]],
    )


def test_top_k_1_equals_greedy():
    logits = jax.random.normal(jax.random.key(1), (16, 50)) * 3
    greedy = SamplingMethod().next_tokens(logits, jax.random.key(0))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
    for seed in range(3):
        top1 = SamplingMethod(temperature=1.5, top_k=1).next_tokens(logits, jax.random.key(seed))
        np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, None, None), (0.8, 4, 0.9), (2.0, None, 0.7)]
)
def test_sampling_frequencies(temperature, top_k, top_p):
    n = 4000
    logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
    want = np.exp(np_process(logits[None], temperature, top_k, top_p)[0])
    want /= want.sum()
    draws = SamplingMethod(temperature, top_k, top_p).next_tokens(
        jnp.tile(jnp.asarray(logits), (n, 1)), jax.random.key(0)
    )
    freq = np.bincount(np.asarray(draws), minlength=logits.size) / n
    tol = 4.5 * np.sqrt(want * (1 - want) / n) + 1e-9  # ~4.5 sigma per entry
    assert np.all(np.abs(freq - want) <= tol), (freq, want)
    assert np.all(freq[want == 0] == 0)


# --------------------------------------------------------------------------------------------------
# The decode loop
# --------------------------------------------------------------------------------------------------


# Sampling at temperature 1 with top-k and top-p filters: the reported log-probs must still be those
# of the raw distribution. Shared with the seed test so that both use one compile.
SAMPLED_KW = dict(temperature=1.0, top_k=8, top_p=0.9, eos_ids=(6,))


@pytest.mark.parametrize("kw", [dict(eos_ids=(6,)), SAMPLED_KW], ids=["greedy", "sampled"])
def test_logprobs_equal_full_forward(model, kw):
    n = 10
    out = generate(model, PROMPTS, max_new_tokens=n, seed=3, **kw)
    assert out.tokens_BxN.shape == out.logprobs_BxN.shape == out.mask_BxN.shape == (len(PROMPTS), n)
    ids, mask = _left_pad(PROMPTS)
    want, argmax = map(
        np.asarray,
        _forward_logprobs(
            model,
            jnp.asarray(ids),
            jnp.asarray(mask),
            jnp.asarray(out.tokens_BxN),
            jnp.asarray(out.mask_BxN),
        ),
    )
    m = out.mask_BxN
    assert m.sum() >= n  # something was generated
    np.testing.assert_allclose(out.logprobs_BxN[m], want[m], atol=2e-5, rtol=1e-5)
    assert np.all(out.logprobs_BxN[~m] == 0)
    if "temperature" not in kw:  # greedy picks the argmax of the same distribution
        np.testing.assert_array_equal(argmax[m], out.tokens_BxN[m])


def test_sampled_tokens_vary_with_seed(model):
    a = generate(model, PROMPTS, max_new_tokens=10, seed=0, **SAMPLED_KW)
    b = generate(model, PROMPTS, max_new_tokens=10, seed=1, **SAMPLED_KW)
    c = generate(model, PROMPTS, max_new_tokens=10, seed=0, **SAMPLED_KW)
    assert not np.array_equal(a.tokens_BxN, b.tokens_BxN)
    np.testing.assert_array_equal(a.tokens_BxN, c.tokens_BxN)


class CountingTransformer(Transformer):
    """Counts forward calls at run time (inside the compiled while loop) via a debug callback."""

    calls: ClassVar[list[int]] = [0]

    def forward(self, tokens_BxL, **kwargs):
        jax.debug.callback(lambda: CountingTransformer.calls.__setitem__(0, self.calls[0] + 1))
        return super().forward(tokens_BxL, **kwargs)


def test_eos_mask_pad_lengths_and_early_stop(model):
    n = 8
    # The free-running greedy decode (no EOS), from the same weights through `generate`.
    free_tokens = generate(model, PROMPTS, max_new_tokens=n).tokens_BxN
    counting = _sharpen(CountingTransformer(CFG, rngs=nnx.Rngs(0)))
    # EOS ids: each row's third greedy token, so every row ends by step 2 at the latest.
    eos_ids = tuple(sorted(set(int(t) for t in free_tokens[:, 2])))
    pad_id = (
        1000  # outside the vocabulary: output-only, never fed to the model (would embed as NaN)
    )
    ids, mask = _left_pad(PROMPTS, pad_id=pad_id)
    CountingTransformer.calls[0] = 0
    out = jax.jit(
        functools.partial(
            sample, max_new_tokens=n, method=SamplingMethod(), pad_id=pad_id, eos_ids=eos_ids
        )
    )(counting, ids, mask, jax.random.key(0))
    out = jax.device_get(out)
    jax.effects_barrier()
    for r in range(len(PROMPTS)):
        first = min(j for j in range(n) if free_tokens[r, j] in eos_ids)  # greedy: same prefix
        assert out.lengths_B[r] == first + 1
        np.testing.assert_array_equal(out.mask_BxN[r], np.arange(n) <= first)
        np.testing.assert_array_equal(out.tokens_BxN[r, : first + 1], free_tokens[r, : first + 1])
        assert (out.tokens_BxN[r, first + 1 :] == pad_id).all()
        assert (out.logprobs_BxN[r, first + 1 :] == 0).all()
    # One prefill plus one decode step per token after the first, stopping once every row is done.
    assert CountingTransformer.calls[0] == out.lengths_B.max() < n


def test_no_eos_runs_full_budget_and_generate_trims(model):
    out = generate(model, PROMPTS, max_new_tokens=5)  # budget bucket 8, trimmed to 5
    assert out.tokens_BxN.shape == (len(PROMPTS), 5)
    assert out.mask_BxN.all() and (out.lengths_B == 5).all()


def test_padding_invariance(model):
    """A greedy row is independent of the other rows and of the prompt, batch and budget buckets."""
    alone = generate(model, [PROMPTS[1]], max_new_tokens=6)
    batched = generate(model, PROMPTS, max_new_tokens=6)  # other rows, batch bucket 4
    long_prompt = list(range(1, 21))  # prompt bucket 32 instead of 8; batch 5 -> bucket 8
    wide = generate(model, [*PROMPTS, long_prompt], max_new_tokens=20)  # budget bucket 32
    for other, row in ((batched, 1), (wide, 1)):
        np.testing.assert_array_equal(other.tokens_BxN[row, :6], alone.tokens_BxN[0])
        np.testing.assert_allclose(other.logprobs_BxN[row, :6], alone.logprobs_BxN[0], atol=1e-5)
    np.testing.assert_array_equal(wide.tokens_BxN[:4, :6], batched.tokens_BxN)


def test_generate_input_errors(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 64]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=2.0)


def test_buckets():
    assert [sampling.bucket_length(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert [sampling.bucket_batch(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]


def test_compile_once_per_bucket(model):
    before = sampling._generate_jit._cache_size()
    # pad_id 11 appears in no other test, so the first call must compile.
    a = generate(model, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=3, pad_id=11)
    assert sampling._generate_jit._cache_size() == before + 1
    b = generate(model, [[9, 10, 12, 13, 14, 15], [16]], max_new_tokens=5, pad_id=11)
    other_weights = _sharpen(create_model(CFG, seed=1))
    c = generate(other_weights, [[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=3, pad_id=11)
    assert (
        sampling._generate_jit._cache_size() == before + 1
    )  # same buckets, new weights: no compile
    assert b.tokens_BxN.shape == (2, 5)
    assert not np.array_equal(a.tokens_BxN, c.tokens_BxN)  # the new weights were used


# --------------------------------------------------------------------------------------------------
# Inside a caller's jit: a toy train step, and nnx.jit
# --------------------------------------------------------------------------------------------------


def test_sample_inside_train_step_with_grad(model):
    graphdef, state = nnx.split(model)
    ids, mask = map(jnp.asarray, _left_pad(PROMPTS))

    def response_nll(state, tokens, resp_mask):
        logp, _ = _forward_logprobs_raw(nnx.merge(graphdef, state), ids, mask, tokens, resp_mask)
        return -jnp.sum(jnp.where(resp_mask, logp, 0.0)) / jnp.maximum(resp_mask.sum(), 1)

    def loss_fn(state, rng):  # samples inside the differentiated function, like an OPD step
        out = sample(nnx.merge(graphdef, state), ids, mask, rng, **JIT_KW)
        other = jnp.sum(
            jnp.square(state["norm"]["weight"][...])
        )  # other computation in the same jit
        return response_nll(state, out.tokens_BxN, out.mask_BxN) + 0.0 * other, out

    @jax.jit
    def train_step(state, rng):
        (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, rng)
        return loss, grads, out

    loss, grads, out = train_step(state, jax.random.key(7))
    # Same draws as the sampler on its own under a plain jit.
    ref_out = _sample_jit(graphdef, state, ids, mask, jax.random.key(7), **JIT_KW)
    np.testing.assert_array_equal(out.tokens_BxN, ref_out.tokens_BxN)
    np.testing.assert_array_equal(out.mask_BxN, ref_out.mask_BxN)
    # Reference gradient: the sampled tokens passed in as constants.
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(response_nll))(
        state, out.tokens_BxN, out.mask_BxN
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4), grads, ref_grads
    )
    assert float(jnp.abs(grads["embed_tokens"]["embedding"][...]).sum()) > 0
    # The sampler's log-probs agree with the second forward's.
    m = np.asarray(out.mask_BxN)
    want, _ = _forward_logprobs(model, ids, mask, out.tokens_BxN, out.mask_BxN)
    np.testing.assert_allclose(np.asarray(out.logprobs_BxN)[m], np.asarray(want)[m], atol=2e-5)


def test_sample_under_nnx_jit_matches_jax_jit(model):
    ids, mask = map(jnp.asarray, _left_pad(PROMPTS))
    via_nnx = nnx.jit(lambda m, r: sample(m, ids, mask, r, **JIT_KW))(model, jax.random.key(2))
    via_jax = _sample_jit(*nnx.split(model), ids, mask, jax.random.key(2), **JIT_KW)
    assert isinstance(via_nnx, SampleOutput)
    np.testing.assert_array_equal(via_nnx.tokens_BxN, via_jax.tokens_BxN)
    np.testing.assert_allclose(via_nnx.logprobs_BxN, via_jax.logprobs_BxN, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Greedy parity with transformers' generate
# --------------------------------------------------------------------------------------------------


def _hf_generate(hf_model, prompts, n, eos, pad_id):
    import torch

    ids, mask = _left_pad(prompts, pad_id=pad_id)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=pad_id,
            eos_token_id=eos,
        )
    return out[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_transformers_generate(family, tmp_path):
    import hf_fixtures as F

    from ctxjax import hf

    # Untied: with tied embeddings a 2-layer random model mostly repeats its last token.
    path = F.make_tiny_hf(family, tmp_path / family, tie=False, seed=1)
    n, pad_id = 12, 0
    prompts = [[5, 17, 3], [9, 2, 44, 31, 8, 60, 12], [33], [21, 7, 7, 50, 1]]  # left padding
    want = _hf_generate(F.load_hf(path), prompts, n, None, pad_id)  # no EOS: the full budget
    assert want.shape == (len(prompts), n) and len(np.unique(want)) > 8  # not a degenerate model
    # EOS: a token row 0 emits mid-way, so rows end at different steps (or never); up to its first
    # EOS each row must follow HF's greedy tokens, then pad.
    eos = int(want[0, 4])
    ours = generate(hf.load_model(path), prompts, max_new_tokens=n, eos_ids=(eos,), pad_id=pad_id)
    for r in range(len(prompts)):
        hits = np.flatnonzero(want[r] == eos)
        length = hits[0] + 1 if hits.size else n
        assert ours.lengths_B[r] == length
        np.testing.assert_array_equal(ours.tokens_BxN[r, :length], want[r, :length])
        assert (ours.tokens_BxN[r, length:] == pad_id).all()
    assert ours.lengths_B.min() < n  # EOS was exercised


@pytest.mark.parametrize("tie,scan", [(True, False), (False, True)])
def test_weights_cast_once_for_the_decode_loop_give_the_same_samples(tie, scan, monkeypatch):
    """float32 weights under bfloat16 compute: `sample` casts the dense kernels, biases and the
    embedding once before its loop (`model.cast_for_compute`); the samples and log-probs equal,
    bit for bit, those of the layers casting on every step (the cast replaced by the identity),
    tied or untied, scanned or not. Norm scales stay float32 (applied in float32)."""
    from ctxjax.model import Numerics, cast_for_compute

    num = Numerics(param_dtype="float32", compute_dtype="bfloat16", scan_layers=scan)
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie, "qkv_bias": True})
    model = _sharpen(create_model(cfg, seed=3, numerics=num))
    cast = cast_for_compute(nnx.state(model), num)
    dtypes = {
        jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)
    }
    assert {d for k, d in dtypes.items() if "norm" in k} == {jnp.dtype(jnp.float32)}
    assert {d for k, d in dtypes.items() if "norm" not in k} == {jnp.dtype(jnp.bfloat16)}

    ids, mask = _left_pad(PROMPTS)
    run = functools.partial(
        sample,
        prompt_ids_BxP=jnp.asarray(ids),
        prompt_mask_BxP=jnp.asarray(mask),
        rng=jax.random.key(7),
        max_new_tokens=6,
        method=SamplingMethod(temperature=1.0),
        eos_ids=(),
        pad_id=0,
    )
    cast_once = run(model)
    monkeypatch.setattr(sampling, "cast_for_compute", lambda state, numerics: state)
    cast_each_step = run(model)
    np.testing.assert_array_equal(cast_once.tokens_BxN, cast_each_step.tokens_BxN)
    np.testing.assert_array_equal(cast_once.logprobs_BxN, cast_each_step.logprobs_BxN)
