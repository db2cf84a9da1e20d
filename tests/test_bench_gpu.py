"""experiments.bench.gpu: `scripts/bench.py gpu --tiny` end to end on the CPU (the JSON it writes
has every figure, says the device's peak is unknown, and its byte counts match the arrays the
library allocates), the device table, and the MFU / decode-bound arithmetic on given numbers."""

import contextlib
import importlib.util
import io
import json
import pathlib

import jax
import numpy as np
import pytest

from experiments.bench import gpu

REPS = 2
PROGRAMS = {f"rest:remat={r},chunk={c}" for r in (0, 1) for c in (0, gpu.TINY_SETUP["chunk"])}


def _bench_main():
    path = pathlib.Path(__file__).parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "bench_gpu.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _bench_main()(["gpu", "--tiny", "--reps", str(REPS), "--out", str(out)])
    return json.loads(out.read_text()), printed.getvalue()


def test_unknown_device_is_said_and_no_mfu_is_made_up(run):
    result, printed = run
    assert jax.default_backend() == "cpu"
    dev = result["device"]
    assert dev["spec"] is None and dev["peak_flops"] is None and dev["hbm_bytes_per_s"] is None
    assert dev["peak_flops_source"] == dev["hbm_source"] == "unknown"
    assert "peak bf16 FLOP/s: UNKNOWN for device kind 'cpu'" in printed
    assert "HBM bandwidth: UNKNOWN" in printed
    train = result["train"]
    assert all(rate["mfu"] is None for rate in train["rates"].values())
    assert train["target"] == {
        "rest_mfu_min": 0.4,
        "applies_to": ["H100 SXM", "H200"],
        "applies": False,
        "met": None,
    }
    decode = result["decode"]
    assert decode["bound_step_s"] is None and decode["over_bound"] is None
    assert decode["target"]["met"] is None
    assert result["memory"]["device_peak_available"] is False
    assert "n/a on this device" in printed and "HBM bound unknown" in printed


def test_setup_is_the_tiny_qwen2_in_bf16(run):
    result, _ = run
    s = result["setup"]
    assert result["tiny"] is True and s["model"] == gpu.TINY_MODEL
    assert (
        s["model"]["family"] == "qwen2" and s["model"]["qkv_bias"] and s["model"]["tie_embeddings"]
    )
    assert (s["param_dtype"], s["compute_dtype"]) == ("float32", "bfloat16")
    assert s["ctx_prompt_len"] == s["context_len"] + s["prompt_len"]
    assert 0 < s["chunk"] < s["new_tokens"]  # the chunked variant really chunks
    # The full-size model is Qwen2.5-0.5B: 494,032,768 parameters (its published count).
    from ctxjax.model import ModelConfig

    assert ModelConfig(**gpu.GPU_MODEL).num_params() == 494_032_768


def test_timing_and_flops(run):
    result, _ = run
    train = result["train"]
    timing = train["timing"]
    assert set(timing) == {"step", "sample", "rest", "sample_1"}
    for name, row in timing.items():
        assert len(row["times_s"]) == REPS and all(t > 0 for t in row["times_s"]), name
        assert row["best_s"] <= row["median_s"], name
    assert train["sum_of_parts_s"] == pytest.approx(
        timing["sample"]["median_s"] + timing["rest"]["median_s"], abs=1e-4
    )
    flops = train["flops_analytic"]
    assert flops["total"] == flops["sample"] + flops["teacher"] + flops["student"]
    rates = train["rates"]
    assert rates["rest"]["flops"] == flops["teacher"] + flops["student"]
    assert rates["step"]["flops"] == flops["total"]
    for name in ("sample", "rest", "step"):
        assert rates[name]["flops_per_s"] == pytest.approx(
            rates[name]["flops"] / timing[name]["median_s"], rel=1e-3
        )
    # XLA's own count of the unchunked rest (no loop in it) against the analytic matmul count.
    assert 0.8 < train["flops_xla_rest"] / rates["rest"]["flops"] < 1.5


def test_decode_bytes_are_the_arrays_a_decode_step_reads(run):
    from flax import nnx

    from ctxjax.model import ModelConfig, Numerics, create_model, init_cache

    result, _ = run
    s, decode = result["setup"], result["decode"]
    cfg = ModelConfig(**s["model"])
    b, slots = s["batch"], s["prompt_len"] + s["new_tokens"]
    model = create_model(cfg, 0, Numerics(param_dtype="float32", compute_dtype="bfloat16"))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    cache = init_cache(cfg, b, slots, "bfloat16")  # what sampling.sample allocates
    kv = sum(x.nbytes for x in cache.k + cache.v)
    weights = sum(x.nbytes for x in params)  # tied: the embedding table is the unembedding
    assert decode["bytes_per_step"] == {"weights": weights, "kv_cache": kv, "total": weights + kv}
    assert decode["cache_slots"] == slots
    step_s = (
        result["train"]["timing"]["sample"]["median_s"]
        - result["train"]["timing"]["sample_1"]["median_s"]
    ) / (s["new_tokens"] - 1)
    assert decode["step_s"] == pytest.approx(step_s, abs=1e-6)


def test_memory_programs(run):
    result, printed = run
    programs = result["memory"]["programs"]
    assert set(programs) == PROGRAMS | {"step"}
    params_bytes = result["decode"]["bytes_per_step"]["weights"]
    for name, row in programs.items():
        assert min(row["argument_bytes"], row["output_bytes"], row["temp_bytes"]) > 0, name
        assert row["estimate_bytes"] == (
            row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
        )
        # The train state (params and AdamW's two moments) is donated: its buffers are reused.
        assert row["alias_bytes"] >= 3 * params_bytes, name
        assert row["first_call_s"] > 0
        assert row["device_peak_bytes"] is None and row["peak_is_upper_bound"] is None
        assert name in printed


@pytest.mark.parametrize(
    "kind, name",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v5", "TPU v5p"),
        ("TPU v6 lite", "TPU v6e"),
        # Not in the table: unknown rather than a sibling's numbers.
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA H100 PCIe", None),
        ("cpu", None),
    ],
)
def test_device_spec(kind, name):
    spec = gpu.device_spec(kind)
    assert (spec and spec.name) == name


def test_peaks_in_the_table():
    peaks = {s.name: (s.peak_flops, s.hbm_bytes_per_s) for s in gpu.DEVICE_SPECS}
    assert peaks["H100 SXM"] == (989e12, 3.35e12)
    assert peaks["H200"] == (989e12, 4.8e12)
    assert peaks["A100 80GB"] == (312e12, 2.0e12)
    assert peaks["TPU v5e"] == (197e12, 0.82e12)
    assert (peaks["TPU v4"][0], peaks["TPU v5p"][0], peaks["TPU v6e"][0]) == (
        275e12,
        459e12,
        918e12,
    )


def _timing(**medians):
    return {k: {"median_s": v} for k, v in medians.items()}


def test_mfu_and_target_on_an_h200():
    """The figures from given times: MFU = analytic FLOPs / median time / peak; 40% target."""
    from ctxjax.config import LossConfig
    from ctxjax.model import ModelConfig
    from experiments.bench import measure

    cfg = ModelConfig(**gpu.GPU_MODEL)
    setup = gpu.GPU_SETUP
    b, c, p, n = (setup[k] for k in ("batch", "context_len", "prompt_len", "new_tokens"))
    flops = measure._step_flops_analytic(cfg, b, p, c + p, n, LossConfig(chunk_size=0))
    rest = flops["teacher"] + flops["student"]
    spec = gpu.device_spec("NVIDIA H200")
    for rest_mfu, met in ((0.5, True), (0.3, False)):
        rest_s = rest / (rest_mfu * spec.peak_flops)
        timing = _timing(sample=2.0, rest=rest_s, step=2.0 + rest_s)
        fig = gpu._train_figures(cfg, setup, timing, 1.0, spec.peak_flops, spec)
        assert fig["rates"]["rest"]["mfu"] == pytest.approx(rest_mfu, abs=1e-5)
        assert fig["rates"]["step"]["mfu"] == pytest.approx(
            flops["total"] / (2.0 + rest_s) / spec.peak_flops, abs=1e-5
        )
        assert fig["target"]["applies"] is True and fig["target"]["met"] is met
    # An A100 has a known peak (so an MFU) but the 40% target is for H100/H200-class GPUs.
    a100 = gpu.device_spec("NVIDIA A100-SXM4-80GB")
    fig = gpu._train_figures(cfg, setup, _timing(sample=1, rest=1, step=2), 1.0, 312e12, a100)
    assert fig["rates"]["rest"]["mfu"] == pytest.approx(rest / 312e12, abs=1e-5)
    assert fig["target"]["applies"] is False and fig["target"]["met"] is None


def test_decode_bound_arithmetic():
    from ctxjax.model import ModelConfig, Numerics

    cfg = ModelConfig(**gpu.GPU_MODEL)
    num = Numerics(param_dtype="bfloat16", compute_dtype="bfloat16")
    setup = gpu.GPU_SETUP
    b, p, n = setup["batch"], setup["prompt_len"], setup["new_tokens"]
    read = gpu.decode_bytes(cfg, num, b, p + n)
    # bf16 weights: 2 bytes per parameter; KV: 24 layers x (K, V) x 2 kv heads x 64 dims, 2 bytes.
    assert read["weights"] == 2 * 494_032_768
    assert read["kv_cache"] == 24 * 2 * b * 2 * (p + n) * 64 * 2
    bound_s = read["total"] / 4.8e12
    for over, met in ((1.5, True), (2.5, False)):
        timing = _timing(sample=1.0 + over * bound_s * (n - 1), sample_1=1.0)
        fig = gpu._decode_figures(cfg, num, setup, timing, 4.8e12)
        assert fig["over_bound"] == pytest.approx(over, abs=1e-3)
        assert fig["tokens_per_s"] == pytest.approx(b / (over * bound_s), rel=1e-3)
        assert fig["target"]["met"] is met


@pytest.mark.parametrize(
    "options, flag",
    [
        (dict(peak_flops=-1.0), "--peak-flops"),
        (dict(hbm_bandwidth=0.0), "--hbm-bandwidth"),
        (dict(reps=0), "--reps"),
        (dict(batch=0), "--batch"),
    ],
)
def test_bad_options_name_the_flag(options, flag):
    with pytest.raises(ValueError, match=flag):
        gpu.measure_gpu(tiny=True, **options)


def test_limit_override_wins_over_the_table():
    spec = gpu.device_spec("NVIDIA H200")
    assert gpu._limit(5e14, spec.peak_flops, spec, "--peak-flops") == (5e14, "--peak-flops")
    assert gpu._limit(None, spec.peak_flops, spec, "--peak-flops") == (989e12, "table: H200")
    assert gpu._limit(None, None, None, "--peak-flops") == (None, "unknown")
    assert np.isfinite(spec.hbm_bytes_per_s)
