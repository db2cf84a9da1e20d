"""ctxjax.losses against float64 numpy formulas written out here (never by calling the jax code)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctxjax import losses

B, T, V = 3, 5, 13
ATOL, RTOL = 2e-6, 2e-5


# --------------------------------------------------------------------------------------------------
# float64 numpy references
# --------------------------------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_kl(logits_p, logits_q):
    """KL(p || q) over the last axis, from logits."""
    logp, logq = np_log_softmax(logits_p), np_log_softmax(logits_q)
    return (np.exp(logp) * (logp - logq)).sum(axis=-1)


def np_jsd(student, teacher, beta):
    p_s, p_t = np.exp(np_log_softmax(student)), np.exp(np_log_softmax(teacher))
    m = beta * p_t + (1 - beta) * p_s
    return beta * (p_t * np.log(p_t / m)).sum(-1) + (1 - beta) * (p_s * np.log(p_s / m)).sum(-1)


def np_topk_reverse_kl(student, teacher, k):
    student, teacher = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    ids = np.argsort(-student, axis=-1)[..., :k]
    return np_kl(np.take_along_axis(student, ids, -1), np.take_along_axis(teacher, ids, -1))


def np_masked_mean(x, mask):
    x, mask = np.asarray(x, np.float64), np.asarray(mask, np.float64)
    return (x * mask).sum() / max(mask.sum(), 1.0)


REFERENCES = {
    # name: (jax fn of (nc, c, teacher), numpy fn of (nc, c, teacher))
    "reverse_kl": (lambda nc, c, t: losses.reverse_kl(nc, t), lambda nc, c, t: np_kl(nc, t)),
    "forward_kl": (lambda nc, c, t: losses.forward_kl(nc, t), lambda nc, c, t: np_kl(t, nc)),
    "topk4": (
        lambda nc, c, t: losses.reverse_kl_topk(nc, t, k=4),
        lambda nc, c, t: np_topk_reverse_kl(nc, t, 4),
    ),
    "jsd0.1": (
        lambda nc, c, t: losses.generalized_jsd(nc, t, 0.1),
        lambda nc, c, t: np_jsd(nc, t, 0.1),
    ),
    "jsd0.5": (
        lambda nc, c, t: losses.generalized_jsd(nc, t, 0.5),
        lambda nc, c, t: np_jsd(nc, t, 0.5),
    ),
    "jsd0.9": (
        lambda nc, c, t: losses.generalized_jsd(nc, t, 0.9),
        lambda nc, c, t: np_jsd(nc, t, 0.9),
    ),
    "nca": (lambda nc, c, t: losses.nca(nc, c), lambda nc, c, t: np_kl(nc, c)),
    "sym_kl": (lambda nc, c, t: losses.sym_kl(nc, c), lambda nc, c, t: np_kl(nc, c) + np_kl(c, nc)),
    "dual_opd": (lambda nc, c, t: losses.dual_opd(c, t), lambda nc, c, t: np_kl(c, t)),
}


@pytest.fixture
def views():
    """Three different logit sets [B, T, V] (no-context, with-context, teacher) and a mask with a
    fully masked row."""
    rng = np.random.default_rng(0)
    nc, c, t = ((2.0 * rng.standard_normal((B, T, V))).astype(np.float32) for _ in range(3))
    mask = rng.random((B, T)) < 0.7
    mask[0] = False
    mask[1, 0] = True
    return nc, c, t, mask


# --------------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------------


def test_masked_mean_and_sum_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T)).astype(np.float32)
    mask = rng.random((B, T)) < 0.5
    mask[2] = False
    weights = (rng.random((B, T)) * mask).astype(np.float32)
    for m in (mask, weights):
        np.testing.assert_allclose(losses.masked_sum(x, m), (x * m).sum(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            losses.masked_mean(x, m), np_masked_mean(x, m), rtol=RTOL, atol=ATOL
        )


def test_masked_mean_all_padding_is_zero_and_padding_garbage_does_not_leak():
    x = np.full((B, T), np.nan, np.float32)
    assert float(losses.masked_mean(x, np.zeros((B, T), bool))) == 0.0
    x[0, 0] = 3.0
    mask = np.zeros((B, T), bool)
    mask[0, 0] = True
    x[1, 1] = np.inf
    assert float(losses.masked_mean(x, mask)) == 3.0
    g = jax.grad(lambda x: losses.masked_mean(x, mask))(jnp.asarray(np.nan_to_num(x, posinf=0.0)))
    np.testing.assert_array_equal(g, mask.astype(np.float32))


def test_masked_mean_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 5\) vs \(3, 4\)"):
        losses.masked_mean(jnp.zeros((3, 5)), jnp.ones((3, 4)))


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REFERENCES))
def test_divergence_matches_numpy_and_masked_mean_is_safe(name, views):
    nc, c, t, mask = views
    jax_fn, np_fn = REFERENCES[name]
    got = jax_fn(nc, c, t)
    want = np_fn(nc, c, t)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    assert np.all(want > 1e-3)  # the three views really differ, so the comparison means something
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # Row 0 is all padding: the masked mean is over the other rows only, and finite.
    np.testing.assert_allclose(losses.masked_mean(got, mask), np_masked_mean(want, mask), rtol=RTOL)
    assert float(losses.masked_mean(got[:1], mask[:1])) == 0.0


@pytest.mark.parametrize("k", [V, V + 7])
def test_topk_with_k_at_least_vocab_is_the_full_reverse_kl(k, views):
    nc, _, t, _ = views
    # The numpy reference keeps all V tokens (argsort[:k] of V entries) and renormalizes nothing.
    got = losses.reverse_kl_topk(nc, t, k=k)
    np.testing.assert_allclose(got, np_topk_reverse_kl(nc, t, k), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got, np_kl(nc, t), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k", [1, 2, 7, V - 1])
def test_topk_small_k_matches_renormalized_numpy(k, views):
    nc, _, t, _ = views
    got = losses.reverse_kl_topk(nc, t, k=k)
    np.testing.assert_allclose(got, np_topk_reverse_kl(nc, t, k), rtol=RTOL, atol=ATOL)
    if k == 1:  # one token renormalizes to probability 1 under both models
        np.testing.assert_array_equal(got, 0.0)


def test_jsd_endpoints_are_the_scaled_limits_not_nan(views):
    nc, _, t, _ = views
    fkl, rkl = np_kl(t, nc), np_kl(nc, t)
    np.testing.assert_allclose(losses.generalized_jsd(nc, t, 0.0), fkl, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(losses.generalized_jsd(nc, t, 1.0), rkl, rtol=RTOL, atol=ATOL)
    # The endpoint values are the limits of JSD(β)/β and JSD(β)/(1-β), as documented.
    # (The convergence is O(β · p_t/p_s), slow where the student puts little mass, hence 1e-4.)
    eps = 1e-4
    np.testing.assert_allclose(losses.generalized_jsd(nc, t, eps) / eps, fkl, rtol=0.02)
    np.testing.assert_allclose(losses.generalized_jsd(nc, t, 1 - eps) / eps, rkl, rtol=0.02)


def test_identical_logits_give_zero(views):
    nc, _, _, _ = views
    tokens = np.zeros((B, T), np.int32)
    for name, spec in losses.OPD_LOSSES.items():
        got = spec.fn(nc, nc, tokens, top_k=5, jsd_beta=0.3)
        np.testing.assert_allclose(got, 0.0, atol=1e-6, err_msg=name)
    for beta in (0.0, 0.3, 1.0):
        np.testing.assert_allclose(losses.generalized_jsd(nc, nc, beta), 0.0, atol=1e-6)
    for name, spec in losses.CONSISTENCY_LOSSES.items():
        got = spec.fn(nc, nc, nc, divergence="reverse_kl", top_k=5, jsd_beta=0.3)
        np.testing.assert_allclose(got, 0.0, atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------------------
# the registry: each name computes its numpy formula (what the train step calls by config name)
# --------------------------------------------------------------------------------------------------


def np_sampled_token(student, teacher, tokens):
    """Value of the policy-gradient surrogate: -A * log p_s(y), A = -(log p_s(y) - log p_t(y))."""

    def pick(logits):
        return np.take_along_axis(np_log_softmax(logits), tokens[..., None], -1)[..., 0]

    lp_s, lp_t = pick(student), pick(teacher)
    return (lp_s - lp_t) * lp_s


NP_OPD = {  # name: numpy fn of (student, teacher, tokens), top_k=4, jsd_beta=0.3
    "reverse_kl": lambda s, t, y: np_kl(s, t),
    "reverse_kl_topk": lambda s, t, y: np_topk_reverse_kl(s, t, 4),
    "forward_kl": lambda s, t, y: np_kl(t, s),
    "jsd": lambda s, t, y: np_jsd(s, t, 0.3),
    "sampled_token": np_sampled_token,
}


@pytest.mark.parametrize("name", list(NP_OPD))
def test_opd_registry_matches_numpy(name, views):
    nc, _, t, _ = views
    tokens = np.random.default_rng(5).integers(0, V, (B, T))
    spec = losses.opd_loss(name)
    got = spec.fn(nc, t, tokens if spec.needs_tokens else None, top_k=4, jsd_beta=0.3)
    want = NP_OPD[name](nc, t, tokens)
    assert np.all(np.abs(want) > 1e-4)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # DualOPD's stand-in: the divergence itself, or the one the sampled-token estimator estimates.
    divergence = "reverse_kl" if name == "sampled_token" else name
    assert spec.divergence == divergence
    assert spec.needs_tokens == (name == "sampled_token")


@pytest.mark.parametrize("divergence", ["reverse_kl", "reverse_kl_topk", "forward_kl", "jsd"])
def test_consistency_registry_matches_numpy(divergence, views):
    nc, c, t, _ = views
    want = {
        "nca": np_kl(nc, c),
        "sym_kl": np_kl(nc, c) + np_kl(c, nc),
        "dual_opd": NP_OPD[divergence](c, t, None),  # the with-context view in the student's place
    }
    assert sorted(losses.CONSISTENCY_LOSSES) == sorted(want)
    for name, spec in losses.CONSISTENCY_LOSSES.items():
        got = spec.fn(nc, c, t, divergence=divergence, top_k=4, jsd_beta=0.3)
        np.testing.assert_allclose(got, want[name], rtol=RTOL, atol=ATOL, err_msg=name)
        assert spec.needs_teacher == (name == "dual_opd")
        # Only DualOPD reads the teacher: any other teacher changes nothing for the other two.
        other = spec.fn(nc, c, c, divergence=divergence, top_k=4, jsd_beta=0.3)
        assert np.array_equal(other, got) != spec.needs_teacher, name


def test_config_accepts_exactly_the_registry_names():
    from ctxjax.config import LossConfig

    for name in losses.OPD_LOSSES:
        assert LossConfig(opd=name).opd == name
    for name in losses.CONSISTENCY_LOSSES:
        assert LossConfig(consistency=name).consistency == name
    with pytest.raises(ValueError, match=r"loss\.opd must be one of.*'sampled_token'.*got 'kl'"):
        LossConfig(opd="kl")
    with pytest.raises(ValueError, match=r"loss\.consistency must be one of.*'sym_kl'.*got 'anc'"):
        LossConfig(consistency="anc")


def test_bf16_inputs_are_computed_in_fp32(views):
    nc, c, t, _ = views
    nc16, c16, t16 = (jnp.asarray(x, jnp.bfloat16) for x in (nc, c, t))
    # The references see exactly the bf16-rounded numbers; bf16 arithmetic would miss by ~1e-2.
    nc_r, c_r, t_r = (np.asarray(x.astype(jnp.float32)) for x in (nc16, c16, t16))
    for name, (jax_fn, np_fn) in REFERENCES.items():
        got = jax_fn(nc16, c16, t16)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(got, np_fn(nc_r, c_r, t_r), rtol=RTOL, atol=ATOL, err_msg=name)
    tokens = np.arange(B * T).reshape(B, T) % V
    lp = losses.token_logprobs(nc16, tokens)
    assert lp.dtype == jnp.float32
    assert (
        losses.sampled_token_pg(lp.astype(jnp.bfloat16), lp.astype(jnp.bfloat16)).dtype
        == jnp.float32
    )
    assert losses.masked_mean(lp.astype(jnp.bfloat16), np.ones((B, T), bool)).dtype == jnp.float32


def test_any_leading_dims_and_jit():
    rng = np.random.default_rng(2)
    s, t = (rng.standard_normal((2, 3, 4, V)).astype(np.float32) for _ in range(2))
    f = jax.jit(lambda s, t: losses.opd_loss("reverse_kl_topk").fn(s, t, None, top_k=5, jsd_beta=0))
    got = f(s, t)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, np_topk_reverse_kl(s, t, 5), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        losses.nca(s[0, 0], t[0, 0]), np_kl(s[0, 0], t[0, 0]), rtol=RTOL, atol=ATOL
    )


def test_neg_inf_vocab_entries_count_zero_with_finite_gradients(views):
    """A vocabulary entry both models mask to -inf (padded vocab) contributes nothing, also to
    gradients."""
    nc, c, t, _ = views
    keep = [v for v in range(V) if v != 4]
    nc_inf, c_inf, t_inf = (x.copy() for x in (nc, c, t))
    for x in (nc_inf, c_inf, t_inf):
        x[..., 4] = -np.inf
    for name, (jax_fn, np_fn) in REFERENCES.items():
        got = jax_fn(nc_inf, c_inf, t_inf)
        np.testing.assert_allclose(
            got,
            np_fn(nc[..., keep], c[..., keep], t[..., keep]),
            rtol=RTOL,
            atol=ATOL,
            err_msg=name,
        )
        for arg in range(3):
            g = _grad(jax_fn, arg, nc_inf, c_inf, t_inf)
            assert np.all(np.isfinite(g)), (name, arg)


# --------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------


def _grad(fn, argnum, *args):
    return np.asarray(jax.grad(lambda *xs: fn(*xs).sum(), argnums=argnum)(*args))


def _two_view_term(name):
    """The registry's consistency term `name` as a function of the two student views only."""
    spec = losses.consistency_loss(name)
    return lambda nc, c: spec.fn(nc, c, None, divergence="reverse_kl", top_k=5, jsd_beta=0.3)


@pytest.mark.parametrize("name", list(losses.OPD_LOSSES))
def test_opd_losses_give_teacher_exactly_zero_gradient(name, views):
    nc, _, t, _ = views
    tokens = np.random.default_rng(6).integers(0, V, (B, T))

    def fn(s, t):
        return losses.opd_loss(name).fn(s, t, tokens, top_k=5, jsd_beta=0.3)

    assert np.all(_grad(fn, 1, nc, t) == 0.0)
    assert np.abs(_grad(fn, 0, nc, t)).max() > 1e-3


def test_jsd_endpoints_and_dual_opd_give_teacher_zero_gradient(views):
    _, c, t, _ = views
    for beta in (0.0, 1.0):
        jsd = functools.partial(losses.generalized_jsd, beta=beta)
        assert np.all(_grad(jsd, 1, c, t) == 0.0)
    dual = losses.consistency_loss("dual_opd").fn

    def fn(c, t):
        return dual(c, c, t, divergence="reverse_kl_topk", top_k=5, jsd_beta=0.3)

    assert np.all(_grad(fn, 1, c, t) == 0.0)
    assert np.abs(_grad(lambda c, t: losses.dual_opd(c, t), 0, c, t)).max() > 1e-3


def test_reverse_kl_student_gradient_matches_closed_form(views):
    nc, _, t, mask = views
    w = mask / max(mask.sum(), 1)
    got = jax.grad(lambda s: losses.masked_mean(losses.reverse_kl(s, t), mask))(nc)
    # d/dz_s Σ p_s (log p_s - log p_t) = p_s ⊙ (log p_s - log p_t - KL)
    logp_s, logp_t = np_log_softmax(nc), np_log_softmax(t)
    d = logp_s - logp_t
    want = np.exp(logp_s) * (d - np_kl(nc, t)[..., None]) * w[..., None]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_nca_gradient_only_reaches_the_with_context_view(views):
    nc, c, _, mask = views

    def fn(nc, c):
        return losses.masked_mean(losses.nca(nc, c), mask)

    g_nc, g_c = jax.grad(fn, argnums=(0, 1))(nc, c)
    assert np.all(np.asarray(g_nc) == 0.0)
    # d/dz_c Σ sg[p_nc] (log p_nc - log p_c) = p_c - p_nc, weighted by the masked-mean weights.
    w = mask / max(mask.sum(), 1)
    want = (np.exp(np_log_softmax(c)) - np.exp(np_log_softmax(nc))) * w[..., None]
    np.testing.assert_allclose(g_c, want, rtol=1e-4, atol=1e-7)
    assert np.abs(want).max() > 1e-3
    # Through the registry, with no teacher at all.
    assert np.all(_grad(_two_view_term("nca"), 0, nc, c) == 0.0)


def test_sym_kl_gradient_reaches_both_views(views):
    nc, c, _, _ = views
    fn = _two_view_term("sym_kl")
    assert np.abs(_grad(fn, 0, nc, c)).max() > 1e-3
    assert np.abs(_grad(fn, 1, nc, c)).max() > 1e-3


def test_token_logprobs_match_numpy(views):
    nc, _, _, _ = views
    tokens = np.random.default_rng(3).integers(0, V, (B, T))
    want = np.take_along_axis(np_log_softmax(nc), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_logprobs(nc, tokens), want, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="tokens of shape"):
        losses.token_logprobs(nc, tokens[:, :2])


def test_sampled_token_pg_gradient_is_minus_advantage_times_score(views):
    s, _, t, mask = views
    tokens = np.random.default_rng(4).integers(0, V, (B, T))

    def loss(s, t):
        lp_s, lp_t = losses.token_logprobs(s, tokens), losses.token_logprobs(t, tokens)
        per_token = losses.sampled_token_pg(lp_s, lp_t)
        return losses.masked_mean(per_token, mask)

    g_s, g_t = jax.grad(loss, argnums=(0, 1))(s, t)
    logp_s, logp_t = np_log_softmax(s), np_log_softmax(t)
    lp_s = np.take_along_axis(logp_s, tokens[..., None], -1)[..., 0]
    lp_t = np.take_along_axis(logp_t, tokens[..., None], -1)[..., 0]
    advantage = -(lp_s - lp_t)
    score = np.eye(V)[tokens] - np.exp(logp_s)  # d log p_s(y) / d logits
    w = mask / max(mask.sum(), 1)
    want = -(advantage * w)[..., None] * score
    np.testing.assert_allclose(g_s, want, rtol=1e-4, atol=1e-7)
    assert np.abs(want).max() > 1e-3
    assert np.all(np.asarray(g_t) == 0.0)
    np.testing.assert_allclose(loss(s, t), np_masked_mean(-advantage * lp_s, mask), rtol=RTOL)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def test_unknown_names_raise_listing_valid_ones(views):
    _, c, t, _ = views
    valid_opd = "reverse_kl, reverse_kl_topk, forward_kl, jsd, sampled_token"
    with pytest.raises(ValueError, match=f"OPD loss 'kl'; valid: {valid_opd}$"):
        losses.opd_loss("kl")
    with pytest.raises(
        ValueError, match=r"consistency loss 'anchor'; valid: nca, dual_opd, sym_kl$"
    ):
        losses.consistency_loss("anchor")
    with pytest.raises(ValueError, match=f"'sampled'; valid: {valid_opd}$"):
        losses.dual_opd(c, t, kind="sampled")
    # DualOPD needs a divergence between two distributions, not a per-sample estimator.
    with pytest.raises(ValueError, match="'sampled_token' needs the sampled tokens"):
        losses.dual_opd(c, t, kind="sampled_token")


def test_bad_arguments_raise(views):
    nc, _, t, _ = views
    with pytest.raises(ValueError, match="k must be >= 1"):
        losses.reverse_kl_topk(nc, t, k=0)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        losses.generalized_jsd(nc, t, beta=1.5)
    with pytest.raises(ValueError, match="shapes differ"):
        losses.reverse_kl(nc, t[..., :-1])
