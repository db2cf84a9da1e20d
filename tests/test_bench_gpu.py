"""experiments.bench.gpu: `scripts/bench.py gpu --tiny` end to end on the CPU (the JSON it writes
has every figure, says the device's peak is unknown, and its byte counts match the arrays the
library allocates), the device table, and the MFU / decode-bound arithmetic on given numbers."""

import contextlib
import importlib.util
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import gpu, measure

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
        _bench_main()(
            ["gpu", "--tiny", "--reps", str(REPS), "--out", str(out), "--profile", str(out.parent)]
        )
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

    from ctxjax.model import ModelConfig, Numerics, cast_for_compute, create_model, init_cache

    result, _ = run
    s, decode = result["setup"], result["decode"]
    cfg = ModelConfig(**s["model"])
    b, slots = s["batch"], s["prompt_len"] + s["new_tokens"]
    num = Numerics(param_dtype="float32", compute_dtype="bfloat16")
    model = create_model(cfg, 0, num)
    # What sampling.sample's loop reads: the weights cast once, the cache it allocates.
    params = jax.tree.leaves(cast_for_compute(nnx.state(model, nnx.Param), num))
    assert {x.dtype for x in params} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    cache = init_cache(cfg, b, slots, "bfloat16")
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


# Measured ceilings for the arithmetic tests: half the H200's datasheet figures.
MEASURED = {"matmul_flops_per_s": 494.5e12, "stream_bytes_per_s": 2.4e12}


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
        fig = gpu._train_figures(cfg, setup, timing, 1.0, spec.peak_flops, spec, MEASURED)
        assert fig["rates"]["rest"]["mfu"] == pytest.approx(rest_mfu, abs=1e-5)
        assert fig["rates"]["rest"]["of_measured_peak"] == pytest.approx(2 * rest_mfu, abs=1e-4)
        assert fig["rates"]["step"]["mfu"] == pytest.approx(
            flops["total"] / (2.0 + rest_s) / spec.peak_flops, abs=1e-5
        )
        assert fig["target"]["applies"] is True and fig["target"]["met"] is met
    # An A100 has a known peak (so an MFU) but the 40% target is for H100/H200-class GPUs.
    a100 = gpu.device_spec("NVIDIA A100-SXM4-80GB")
    fig = gpu._train_figures(
        cfg, setup, _timing(sample=1, rest=1, step=2), 1.0, 312e12, a100, MEASURED
    )
    assert fig["rates"]["rest"]["mfu"] == pytest.approx(rest / 312e12, abs=1e-5)
    assert fig["target"]["applies"] is False and fig["target"]["met"] is None


def test_decode_bound_arithmetic():
    from ctxjax.model import ModelConfig, Numerics

    cfg = ModelConfig(**gpu.GPU_MODEL)
    num = Numerics(param_dtype="bfloat16", compute_dtype="bfloat16")
    setup = gpu.GPU_SETUP
    b, p, n = setup["batch"], setup["prompt_len"], setup["new_tokens"]
    read = measure.decode_bytes(cfg, num, b, p + n)
    # bf16 weights: 2 bytes per parameter; KV: 24 layers x (K, V) x 2 kv heads x 64 dims, 2 bytes.
    assert read["weights"] == 2 * 494_032_768
    # float32-stored weights are read in bf16 (cast once per rollout) but the 49 norm scales
    # (2 per layer and the final one, [896] each), applied in float32.
    f32 = measure.decode_bytes(
        cfg, Numerics(param_dtype="float32", compute_dtype="bfloat16"), b, p + n
    )
    assert f32["weights"] == read["weights"] + 2 * 49 * 896
    assert read["kv_cache"] == 24 * 2 * b * 2 * (p + n) * 64 * 2
    bound_s = read["total"] / 4.8e12
    for over, met in ((1.5, True), (2.5, False)):
        timing = _timing(sample=1.0 + over * bound_s * (n - 1), sample_1=1.0)
        fig = gpu._decode_figures(cfg, num, setup, timing, 4.8e12, MEASURED)
        assert fig["over_bound"] == pytest.approx(over, abs=1e-3)
        # The same bound at the measured streaming rate (2.4 TB/s: half the datasheet's).
        assert fig["over_measured_bound"] == pytest.approx(over / 2, abs=1e-3)
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


def test_measured_ceilings_and_the_fractions_of_them(run):
    result, printed = run
    measured = result["device"]["measured"]
    assert measured["matmul_n"] == gpu.CEILING_MATMUL_N[True]
    assert measured["stream_bytes"] == 2 * gpu.CEILING_STREAM_BYTES[True]
    assert measured["matmul_flops_per_s"] > 0 and measured["stream_bytes_per_s"] > 0
    for name, rate in result["train"]["rates"].items():
        assert rate["of_measured_peak"] == pytest.approx(
            rate["flops_per_s"] / measured["matmul_flops_per_s"], rel=1e-3
        ), name
    decode = result["decode"]
    assert decode["over_measured_bound"] == pytest.approx(
        decode["step_s"] * measured["stream_bytes_per_s"] / decode["bytes_per_step"]["total"],
        rel=1e-2,
    )
    assert "measured in this run: bf16 128^3 matmul" in printed


def test_profiles_of_the_sampler_and_the_rest(run):
    result, printed = run
    for part in ("sample", "rest"):
        prof = result["profile"][part]
        assert pathlib.Path(prof["trace"]).is_file()
        assert prof["source"] == "host XLA ops" and prof["events"] > 0
        top = prof["top"]
        assert [r["total_s"] for r in top] == sorted((r["total_s"] for r in top), reverse=True)
        assert 0 < sum(r["share"] for r in top) <= 1 + 1e-3
        assert all(
            r["share"] == pytest.approx(r["total_s"] / prof["busy_s"], abs=1e-4) for r in top
        )
        assert f"profile of one {part} call" in printed
        assert sum(prof["categories"].values()) == pytest.approx(1, abs=1e-3)
    # The decode loop's body ops are counted, the loop itself is not (its body nests inside it).
    assert not any(r["op"].startswith("while") for r in result["profile"]["sample"]["top"])
    assert any(
        r["calls"] >= gpu.TINY_SETUP["new_tokens"] - 1 for r in result["profile"]["sample"]["top"]
    )


def _trace(tmp_path, events):
    import gzip

    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    return str(path)


def _meta(pid, name):
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}


def test_op_times_sums_device_kernels_by_name(tmp_path):
    """XLA's GPU runtime runs kernels inside command buffers (CUDA graphs): every kernel event
    carries the buffer's `hlo_op`, so device rows are keyed by the kernel's own name."""
    from experiments.bench import profile

    def kernel(ts, dur, op, name="k"):
        return {"ph": "X", "pid": 2, "tid": 1, "ts": ts, "dur": dur, "name": name,
                "args": {"hlo_op": op}}  # fmt: skip

    events = [
        _meta(1, "/host:CPU"),
        _meta(2, "/device:GPU:0"),
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 900, "name": "host", "args": {}},
        kernel(100, 30, "command_buffer_1", "loop_fusion_kernel"),
        kernel(200, 50, "command_buffer_1", "sm90_gemm"),
        kernel(300, 30, "while.2", "loop_fusion_kernel"),
    ]
    got = profile.op_times(_trace(tmp_path, events), top=5)
    assert got["source"] == "device" and got["events"] == 3
    assert got["busy_s"] == pytest.approx(110e-6) and got["span_s"] == pytest.approx(230e-6)
    assert [(r["kernel"], r["calls"], r["op"]) for r in got["top"]] == [
        ("loop_fusion_kernel", 2, "command_buffer_1"),
        ("sm90_gemm", 1, "command_buffer_1"),
    ]
    assert got["categories"] == pytest.approx({"other": 60 / 110, "matmul": 50 / 110}, abs=1e-4)
    assert got["top"][0]["total_s"] == pytest.approx(60e-6)
    assert got["top"][0]["share"] == pytest.approx(60 / 110, abs=1e-4)


def test_op_times_on_a_host_trace_leaves_out_loop_containers(tmp_path):
    from experiments.bench import profile

    def op(ts, dur, name):
        return {"ph": "X", "pid": 1, "tid": 1, "ts": ts, "dur": dur, "name": name,
                "args": {"hlo_op": name}}  # fmt: skip

    events = [_meta(1, "/host:CPU"), op(0, 100, "while.3"), op(10, 40, "dot.1"), op(60, 20, "add")]
    got = profile.op_times(_trace(tmp_path, events))
    assert got["source"] == "host XLA ops"
    assert all(r["op"] == r["kernel"] for r in got["top"])
    assert {r["op"]: r["total_s"] for r in got["top"]} == pytest.approx(
        {"dot.1": 40e-6, "add": 20e-6}
    )
    with pytest.raises(ValueError, match="no device or XLA op events"):
        profile.op_times(_trace(tmp_path, [_meta(1, "/host:CPU")]))


@pytest.mark.parametrize(
    "kernel, kind",
    [
        ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "matmul"),
        ("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n", "matmul"),
        ("gemm_fusion_dot_289", "matmul"),
        ("void cub::detail::radix_sort::DeviceSegmentedRadixSortKernel<>", "sort"),
        ("loop_transpose_fusion_191", "transpose"),
        ("MemcpyD2H", "copy"),
        ("input_reduce_fusion_28", "other"),
    ],
)
def test_kernel_categories(kernel, kind):
    from experiments.bench import profile

    assert profile.category(kernel) == kind


def test_gpu_page_section_from_saved_json(run, tmp_path):
    """`gpu --from-json --ab-json --out-md` rewrites only the page's accelerator section, from the
    saved results (the tiny run's here; `experiments.gpu_ab --tiny` for the A/Bs), and prints it;
    regenerating the CPU step page afterwards keeps that measured section."""
    from experiments import gpu_ab
    from experiments.bench import report

    result, _ = run
    saved, ab_path, page_path = tmp_path / "gpu.json", tmp_path / "ab.json", tmp_path / "perf.md"
    saved.write_text(json.dumps(result))
    with contextlib.redirect_stdout(io.StringIO()):
        gpu_ab.main(["--tiny", "--reps", "1", "--out", str(ab_path)])
    ab = json.loads(ab_path.read_text())
    assert (
        ab["sampler_cast"]["tokens_equal"] and ab["attention"]["ours"]["max_abs_diff_vs_ours"] == 0
    )
    head = "# Performance\n\nthe CPU tables\n\n"
    page_path.write_text(head + report.NOT_MEASURED_SECTION)
    printed = io.StringIO()
    argv = ["gpu", "--from-json", str(saved), "--ab-json", str(ab_path), "--out-md", str(page_path)]
    with contextlib.redirect_stdout(printed):
        _bench_main()(argv)
    page = page_path.read_text()
    assert page.startswith(head) and "not measured" not in page
    section = report.accelerator_section(page)
    assert section.startswith("## Accelerators: one cpu")
    assert f"`python scripts/bench.py {' '.join(argv)}`" in section
    step_s = result["train"]["timing"]["step"]["median_s"]
    assert f"| the whole step (`step.make_train_step`) | {step_s:.4f} s |" in section
    assert "### Where the time goes" in section and "### Side by side" in section
    env = result["environment"]
    assert f"jax {jax.__version__}, measured {env['measured_at']}. Host: Machine: " in section
    assert "gpu benchmark on cpu" in printed.getvalue()
    # The step benchmark's page says "not measured"; the measured section outlives it.
    new_cpu_page = "# Performance\n\nnew CPU tables\n\n" + report.NOT_MEASURED_SECTION
    regenerated = report.keep_measured_accelerators(new_cpu_page, page)
    assert regenerated.startswith("# Performance\n\nnew CPU tables\n")
    assert report.accelerator_section(regenerated) == section
    # ... but an unmeasured old section does not replace the new page's own.
    fresh = "# P\n\n" + report.NOT_MEASURED_SECTION
    assert report.keep_measured_accelerators(fresh, head + report.NOT_MEASURED_SECTION) == fresh


def test_a_bad_saved_result_is_named(tmp_path):
    bad = tmp_path / "gpu.json"
    bad.write_text('{"device":\n  oops}')
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        _bench_main()(["gpu", "--from-json", str(bad)])
    assert f"--from-json: {bad}, line 2: not JSON" in err.getvalue()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        _bench_main()(["gpu", "--from-json", str(tmp_path / "missing.json")])
    assert "--from-json: no such file" in err.getvalue()
