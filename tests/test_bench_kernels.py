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
    for part in ("sample", "teacher", "student"):
        total = sum(g.flops * count for g, count in gemms[part].items()) + attention[part]
        assert total == analytic[part], part


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
    it), each part's best floor is its analytic FLOPs at the peak; sampling is held up to its
    memory floor when that is larger; the optimizer streams 7 fp32 copies of the parameters."""
    peak, stream = 100e9, 10e9
    slower = ({"xla", "torch"} - {faster}).pop()
    case = measure.STEP_CASES["a"]
    cfg = ModelConfig(**case.model)
    gemms = {g for counts in kernels.step_gemms(cfg, *_sizes(case)).values() for g in counts}
    times = {g: {f"{faster}_s": g.flops / peak, f"{slower}_s": 2 * g.flops / peak} for g in gemms}
    analytic = measure._step_flops_analytic(cfg, *_sizes(case), LossConfig(opd="reverse_kl"))
    optimizer_s = 7 * 4 * cfg.num_params() / stream
    for memory_s in (0.0, 10.0):
        out = kernels.kernel_floor(case, times, peak, stream, memory_s)
        best = out["floors"]["best"]["parts_s"]
        assert best["sample"] == pytest.approx(max(analytic["sample"] / peak, memory_s))
        for part in ("teacher", "student"):
            assert best[part] == pytest.approx(analytic[part] / peak)
        assert best["optimizer"] == pytest.approx(optimizer_s)
        assert out["floors"][faster] == out["floors"]["best"]
        assert out["floors"][slower]["parts_s"]["student"] > best["student"]
        assert out["floors"]["best"]["step_s"] == pytest.approx(sum(best.values()))
    assert len(out["gemms"]) == len(gemms) and all(g["count"] for g in out["gemms"])


def test_gemm_timings_are_positive_and_the_fastest_of_both_rounds():
    """`time_gemms` times every distinct product of the tiny case with both libraries; `fastest`
    keeps, per product and library, the faster of two rounds."""
    case = measure.STEP_CASES["quick"]
    first, second = kernels.time_gemms(case, reps=1), kernels.time_gemms(case, reps=1)
    cfg = ModelConfig(**case.model)
    assert set(first) == {g for c in kernels.step_gemms(cfg, *_sizes(case)).values() for g in c}
    both = kernels.fastest(first, second)
    for g, t in both.items():
        for lib in ("xla_s", "torch_s"):
            assert 0 < t[lib] == min(first[g][lib], second[g][lib])
