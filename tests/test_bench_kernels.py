"""experiments.bench.kernels: the step's kernel floor. Its list of GEMMs against the step's analytic
FLOP count, each product's operands against numpy (both weight layouts, both libraries), and the
floor's arithmetic with fake kernel timings whose right answer is known."""

import numpy as np
import pytest

from ctxjax.config import LossConfig
from ctxjax.model import ModelConfig
from experiments.bench import kernels, measure


def _sizes(case):
    return case.batch, case.prompt_len, case.context_len + case.prompt_len, case.new_tokens


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_the_gemms_and_the_attention_are_the_steps_matmul_flops(name):
    """Every part's GEMMs plus its attention products add up to `_step_flops_analytic`, which
    counts the same step another way (per token and layer, backward = 2x forward)."""
    case = measure.STEP_CASES[name]
    cfg = ModelConfig(**case.model)
    b, p, q, n = _sizes(case)
    analytic = measure._step_flops_analytic(cfg, b, p, q, n, LossConfig(opd="reverse_kl"))
    gemms = kernels.step_gemms(cfg, b, p, q, n)
    attention = kernels.attention_flops(cfg, b, p, q, n)
    flops = {part: sum(g.flops * count for g, count in c.items()) for part, c in gemms.items()}
    for part in ("sample", "teacher", "student"):
        decode = flops["decode"] if part == "sample" else 0  # the sampler's steps after the first
        assert flops[part] + decode + attention[part] == analytic[part], part
    # The decode part is N - 1 steps of `_decode_chain`'s products: the model's every dense
    # layer and its unembedding, one row per sequence.
    per_step = sum(2 * b * k * nn for k, nn in kernels.dense_shapes(cfg)) * cfg.num_layers
    per_step += 2 * b * cfg.hidden_size * cfg.vocab_size
    assert flops["decode"] == (n - 1) * per_step


@pytest.mark.parametrize("kind", kernels.KINDS)
@pytest.mark.parametrize("out_major", [False, True])
def test_each_product_is_the_one_the_backward_pass_computes(kind, out_major):
    """y = x @ W: forward x @ W, input gradient dy @ W^T, weight gradient x^T @ dy (in the
    stored layout), whether W is stored [K, N] or [N, K]; XLA's and torch's calls alike."""
    import jax

    g = kernels.Gemm(5, 3, 4, kind)
    lhs, rhs, dims = kernels._operands(g, out_major)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((5, 3), np.float32), rng.standard_normal((5, 4), np.float32)
    w = rng.standard_normal((4, 3) if out_major else (3, 4), np.float32)
    w_kn = w.T if out_major else w
    want = {"fwd": x @ w_kn, "dx": dy @ w_kn.T, "dw": x.T @ dy}[kind]
    if kind == "dw" and out_major:
        want = want.T
    np.testing.assert_allclose(np.asarray(jax.lax.dot_general(lhs, rhs, dims)), want, rtol=1e-5)
    np.testing.assert_allclose(kernels._torch_product(g, out_major)().numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("faster", ["xla", "torch"])
def test_the_floor_takes_the_faster_kernel_and_the_memory_floor(faster):
    """With every product at `flops / rate` (the faster library at the peak, the other at half of
    it) and a decode step at its products' FLOPs at the same rates, each part's best floor is its
    analytic FLOPs at the peak; sampling is held up to its memory floor when that is larger; the
    optimizer streams 7 fp32 copies of the parameters."""
    peak, stream = 100e9, 10e9
    slower = ({"xla", "torch"} - {faster}).pop()
    case = measure.STEP_CASES["a"]
    cfg = ModelConfig(**case.model)
    parts = kernels.step_gemms(cfg, *_sizes(case))
    gemms = {g for name, counts in parts.items() if name != "decode" for g in counts}
    times = {g: {f"{faster}_s": g.flops / peak, f"{slower}_s": 2 * g.flops / peak} for g in gemms}
    step_s = sum(g.flops * c for g, c in parts["decode"].items()) / (case.new_tokens - 1) / peak
    decode_step = {f"{faster}_s": step_s, f"{slower}_s": 2 * step_s}
    analytic = measure._step_flops_analytic(cfg, *_sizes(case), LossConfig(opd="reverse_kl"))
    optimizer_s = 7 * 4 * cfg.num_params() / stream
    for memory_s in (0.0, 10.0):
        out = kernels.kernel_floor(case, times, decode_step, peak, stream, memory_s)
        best = out["floors"]["best"]["parts_s"]
        assert best["sample"] == pytest.approx(max(analytic["sample"] / peak, memory_s))
        for part in ("teacher", "student"):
            assert best[part] == pytest.approx(analytic[part] / peak)
        assert best["optimizer"] == pytest.approx(optimizer_s)
        assert out["floors"][faster] == out["floors"]["best"]
        assert out["floors"][slower]["parts_s"]["student"] > best["student"]
        assert out["floors"]["best"]["step_s"] == pytest.approx(sum(best.values()))
        assert out["decode_step"] == decode_step
        if memory_s == 0.0:  # the slower library's decode steps count at its own time
            extra = (case.new_tokens - 1) * step_s
            assert out["floors"][slower]["parts_s"]["sample"] > best["sample"] + extra * 0.999
    assert len(out["gemms"]) == len(gemms) and all(g["count"] for g in out["gemms"])


def test_the_decode_chain_is_the_decode_steps_products():
    """`_decode_chain` runs each decode product once per step on its own matrix, in the
    sampler's order (q, k, v, o, gate, up, down per layer, then the unembedding), and its output
    depends on every product: against a numpy run of the same ops, for both weight layouts, with
    jax and with torch."""
    import jax
    import jax.numpy as jnp
    import torch

    cfg = ModelConfig(**measure.STEP_CASES["quick"].model)
    x = np.random.default_rng(1).standard_normal((3, cfg.hidden_size), np.float32)
    shapes = [(k, n) for k, n in kernels.dense_shapes(cfg)] * cfg.num_layers
    shapes.append((cfg.hidden_size, cfg.vocab_size))
    for out_major in (False, True):
        weights = kernels._decode_weights(cfg, out_major)
        assert [w.shape[::-1] if out_major else w.shape for w in weights] == shapes
        kn = [w.T if out_major else w for w in weights]
        seen = []

        def numpy_matmul(a, w, seen=seen):
            seen.append(w.shape)
            return a.astype(np.float64) @ w.astype(np.float64)

        want = kernels._decode_chain(x, kn, numpy_matmul, cfg.num_layers)
        assert seen == shapes  # every matrix once, in order
        dims = kernels.forward_dims(out_major)
        got = kernels._decode_chain(
            jnp.asarray(x),
            [jnp.asarray(w) for w in weights],
            lambda a, w, dims=dims: jax.lax.dot_general(a, w, dims),
            cfg.num_layers,
        )
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        matmul = torch.nn.functional.linear if out_major else torch.matmul
        got_t = kernels._decode_chain(
            torch.from_numpy(x), [torch.from_numpy(w) for w in weights], matmul, cfg.num_layers
        )
        np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-5, atol=1e-6)

    # The last layer's down projection reaches the output: the compiler cannot cut the chain.
    def f64(a, b):
        return a.astype(np.float64) @ b.astype(np.float64)

    w = kernels._decode_weights(cfg, False)
    base = kernels._decode_chain(x, w, f64, cfg.num_layers)
    w[-2] = w[-2] * 2
    assert not np.array_equal(kernels._decode_chain(x, w, f64, cfg.num_layers), base)


def test_decode_step_timings_are_positive_and_scale_with_the_model():
    """`time_decode_step` gives both libraries' seconds per step; config a's step (4 layers of
    width 256) takes longer than the tiny test model's (1 layer of width 16)."""
    tiny = kernels.time_decode_step(measure.STEP_CASES["quick"], reps=1)
    a = kernels.time_decode_step(measure.STEP_CASES["a"], reps=1)
    for lib in ("xla_s", "torch_s"):
        assert 0 < tiny[lib] < a[lib], lib


def test_gemm_timings_are_positive_and_the_fastest_of_both_rounds():
    """`time_gemms` times every distinct product of the tiny case with both libraries; `fastest`
    keeps, per product and library, the faster of two rounds."""
    case = measure.STEP_CASES["quick"]
    first, second = kernels.time_gemms(case, reps=1), kernels.time_gemms(case, reps=1)
    cfg = ModelConfig(**case.model)
    parts = kernels.step_gemms(cfg, *_sizes(case))
    assert set(first) == {g for name, c in parts.items() if name != "decode" for g in c}
    both = kernels.fastest(first, second)
    for g, t in both.items():
        for lib in ("xla_s", "torch_s"):
            assert 0 < t[lib] == min(first[g][lib], second[g][lib])
