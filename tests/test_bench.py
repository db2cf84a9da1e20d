"""experiments.bench: the train benchmark in its quick mode (the JSON it writes has every figure,
and the figures are sane: positive times and FLOPs, memory sizes that add up, chunking that saves
memory), the weight-streaming rate against an exact fake clock and a numpy reference, and
`scripts/bench.py step --quick` end to end (ratio and peak fractions from the measured medians,
the markdown page) with its PyTorch-way step checked against the library's loss and update."""

import json
import os
import runpy
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench
from experiments.bench import measure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("step", "sample", "teacher", "student", "optimizer")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_train.json"
    returned = bench.run("train", str(out), quick=True)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(returned))  # the file is the returned dict
    return written


def test_timing_parts_positive(result):
    timing = result["time"]["timing"]
    assert set(timing) == set(PARTS)
    for name, row in timing.items():
        assert len(row["times_s"]) == result["time"]["setup"]["reps"] == 2
        assert all(t > 0 for t in row["times_s"]), name
        assert row["best_s"] <= row["median_s"], name
        assert row["share_of_step"] == pytest.approx(
            row["median_s"] / timing["step"]["median_s"], rel=1e-2, abs=1e-3
        )
    setup = result["time"]["setup"]
    tokens = setup["batch"] * setup["new_tokens"]
    assert timing["step"]["tokens_per_s"] == pytest.approx(
        tokens / timing["step"]["median_s"], rel=1e-2
    )


def test_flops_and_peak(result):
    flops, peak = result["time"]["flops"], result["peak_matmul"]
    assert peak["flops_per_s"] > 1e8  # any CPU does >= 0.1 GFLOP/s on a 1024^3 fp32 matmul
    analytic = flops["analytic"]
    assert analytic["total"] == analytic["sample"] + analytic["teacher"] + analytic["student"]
    assert min(analytic["sample"], analytic["teacher"], analytic["student"]) > 0
    assert flops["xla_decode_step"] > 0
    assert flops["xla_loop_corrected"] > flops["xla_raw"] > 0
    # Matmuls dominate even the tiny model: XLA's count (which adds softmaxes, norms, the optimizer)
    # is near the analytic matmul count, not off by an order of magnitude.
    assert 0.5 < flops["xla_loop_corrected"] / analytic["total"] < 2.0
    for key in ("fraction_of_peak_analytic", "fraction_of_peak_xla_loop_corrected"):
        assert 0 < flops[key] < 1.5, key  # > 1 would mean a broken timer or FLOP count


def test_memory_figures(result):
    mem = result["memory"]
    s = mem["setup"]
    b, c, p, n = s["batch"], s["context_len"], s["prompt_len"], s["new_tokens"]
    v = s["model"]["vocab_size"]
    assert mem["full_logits_bytes"] == 4 * b * v * ((c + p + n) + (p + n) + (c + p + n))
    assert mem["response_logits_bytes"] == 3 * 4 * b * n * v
    # Quick mode skips the whole-step compile (`train_step` is empty); the full run fills it.
    assert list(mem["train_step"]) == [str(k) for k in s["step_chunks"]]
    assert list(mem["loss_only"]) == [str(k) for k in s["loss_chunks"]]
    for prog in ("train_step", "loss_only"):
        for row in mem[prog].values():
            assert row["temp_bytes"] > 0 and row["argument_bytes"] > 0 and row["output_bytes"] > 0
            assert row["temp_over_full_logits"] == pytest.approx(
                row["temp_bytes"] / mem["full_logits_bytes"], abs=1e-4
            )
    loss = mem["loss_only"]
    for chunk, row in loss.items():
        if chunk != "0":  # chunking the loss must cut its temporaries
            assert row["temp_bytes"] < loss["0"]["temp_bytes"], chunk
    # Arguments of the loss alone: three [B, N, D] hidden states, two [D, V] unembeddings, the mask
    # (bool) and the tokens (int32; pruned by jit when the divergence does not read them).
    d = s["model"]["hidden_size"]
    floats = 4 * (3 * b * n * d + 2 * d * v)
    assert floats + b * n <= loss["0"]["argument_bytes"] <= floats + 5 * b * n
    # Unchunked, the loss holds at least the three passes' response logits at once.
    assert loss["0"]["temp_bytes"] >= mem["response_logits_bytes"]


@pytest.mark.parametrize("tie", [True, False])
def test_decode_bytes_counts_every_read_weight_and_the_cache(tie):
    from ctxjax.model import DEFAULT_NUMERICS, ModelConfig

    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=tie,
        qk_norm=False,
    )
    # Counted by hand: per layer q/k/v/o, gate/up/down and two norms; the final norm; the
    # unembedding (the tied table is read once as the unembedding; an untied table only a row per
    # token, which is not counted, and its lm_head in full).
    d, f, dh = 32, 80, 8
    per_layer = d * (4 + 2 * 2) * dh + 4 * dh * d + 3 * d * f + 2 * d
    read_params = 3 * per_layer + d + d * 96
    kv = 3 * 2 * 5 * 2 * 40 * 8  # layers x (K, V) x batch x kv heads x slots x head dim
    read = measure.decode_bytes(cfg, DEFAULT_NUMERICS, batch=5, cache_slots=40)
    assert read == {"weights": 4 * read_params, "kv_cache": 4 * kv, "total": 4 * (read_params + kv)}


def test_weight_stream_rate_divides_the_bytes_streamed_by_the_median_call(monkeypatch):
    # A fake clock: call i of the timed loop takes (i + 1) * 0.25 s, so the median of 3 is 0.5 s.
    ticks = iter([0.0, 0.25, 1.0, 1.5, 2.0, 2.75])
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    width, mats, reps = 32, 3, 7
    rate = measure.weight_stream_rate(width=width, mats=mats, reps=reps, calls=3)
    assert rate == pytest.approx(mats * reps * (width * 4 * width * 4) / 0.5)


def test_memory_read_rate_divides_the_bytes_by_the_fastest_call(monkeypatch):
    # A fake clock: after the untimed warm-up, calls of 0.5, 0.25 and 0.75 s: the fastest is 0.25 s.
    from experiments.bench import kernels

    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.75])
    monkeypatch.setattr(kernels, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    rate = measure.memory_read_rate(total_bytes=2**20, arrays=4, calls=3)
    assert rate == pytest.approx(2**20 / 0.25)


def test_memory_read_rate_reads_every_byte():
    # The sum must read all of each array: XLA could fold a sum of a constant-filled array it
    # built itself, so the arrays come in as arguments. Against a numpy sum of the same bytes,
    # within 20x either way (a read folded away or a missed array is off by far more).
    total = 2**26
    ours = measure.memory_read_rate(total_bytes=total, arrays=4, calls=3)
    x = np.ones(total // 4, np.float32)
    t0 = time.perf_counter()
    for _ in range(3):
        x.sum()
    numpy_rate = 3 * total / (time.perf_counter() - t0)
    assert 0.05 < ours / numpy_rate < 20


def _numpy_stream_rate(batch: int, width: int, mats: int, reps: int, calls: int) -> float:
    """The same loop in numpy (BLAS), the same bytes over the median call."""
    rng = np.random.default_rng(0)
    ws = [rng.normal(0, 0.01, (width, 4 * width)).astype(np.float32) for _ in range(mats)]
    times = []
    for _ in range(calls):
        x = np.ones((batch, width), np.float32)
        t0 = time.perf_counter()
        for _ in range(reps):
            for w in ws:
                x = x + (x @ w)[:, :width] * 1e-3
        times.append(time.perf_counter() - t0)
    return mats * reps * ws[0].nbytes / statistics.median(times)


def test_weight_stream_rate_is_near_numpys():
    # Same matmuls, same byte count: the jitted loop is within 20x of numpy's either way (on a
    # quiet CPU within 2x; the slack is for other processes on a shared machine). A unit slip
    # (MiB vs bytes, a missed `reps` or `mats`) is off by 16x-1000x and fails.
    kw = dict(batch=8, width=64, mats=4, reps=10, calls=5)
    ours = measure.weight_stream_rate(**kw)
    assert 0.05 < ours / _numpy_stream_rate(**kw) < 20


def test_print_sample_reads_only_the_result(capsys):
    """Printing is apart from measuring: a hand-made result prints, each figure where it belongs."""
    timing = {"tokens_per_s": 60.2, "median_s": 0.133, "best_s": 0.13}
    result = {
        "setup": {"batch": 2, "prompt_len": 4, "new_tokens": 4, "reps": 3, "load_avg_1min": [1, 2]},
        "ctxjax": {**timing, "compile_s": 17.8},
        "transformers": {**timing, "tokens_per_s": 21.8, "torch_threads": 1},
        "transformers_by_threads": {
            "1": {**timing, "tokens_per_s": 21.8},
            "4": {"skipped": "slow"},
        },
        "speedup": 2.76,
        "tokens_identical": True,
        "memory_floor": {
            "bytes_per_decode_step": 2**24,
            "weight_stream_gb_per_s": 11.9,
            "read_gb_per_s": 25.5,
            "floor_gb_per_s": 25.5,
            "floor_ms_per_step": 1.5,
            "ctxjax_ms_per_step": 33.2,
            "floor_tokens_per_s": 1356.0,
            "floor_speedup": 62.2,
        },
    }
    bench.BENCHMARKS["sample"][2](result)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sample: batch 2, prompt 4, 4 new tokens, greedy, median of 3")
    assert lines[2].split() == ["ctxjax", "60.2", "0.1330", "0.1300", "17.80"]
    assert lines[3].split()[-4:] == ["21.8", "0.1330", "0.1300", "-"]
    assert lines[4].split()[-2:] == ["skipped:", "slow"]
    assert "(1 thr): 2.76x; identical tokens: True" in lines[5]
    assert (
        "16.0 MiB per decode step at 25.5 GB/s (the faster of weight streaming, 11.9, and a "
        "plain read, 25.5)" in lines[6]
    )


# --------------------------------------------------------------------------------------------------
# `scripts/bench.py step`: ctxjax's step against the PyTorch way
# --------------------------------------------------------------------------------------------------

STEP_ROWS = ("step", "sample", "teacher", "student", "optimizer")


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    """`scripts/bench.py step --quick` end to end, in this process: its JSON and its markdown."""
    out = tmp_path_factory.mktemp("bench_step")
    argv = ["step", "--quick", "--out", str(out / "step.json"), "--out-md", str(out / "perf.md")]
    runpy.run_path(os.path.join(ROOT, "scripts", "bench.py"))["main"](argv)
    return json.loads((out / "step.json").read_text()), (out / "perf.md").read_text(), argv


def test_step_times_and_ratio_come_from_the_measured_medians(step_run):
    result, _, _ = step_run
    assert list(result["configs"]) == ["quick"]
    c = result["configs"]["quick"]
    assert c["setup"]["reps"] == 2
    for side in ("ctxjax", "pytorch"):
        assert set(c[side]) == set(STEP_ROWS), side
        for part, row in c[side].items():
            assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"]), (side, part)
            assert row["median_s"] == pytest.approx(statistics.median(row["times_s"]), abs=2e-5)
    # The ratio is the PyTorch way's median step over ctxjax's, not a constant.
    ratio = c["pytorch"]["step"]["median_s"] / c["ctxjax"]["step"]["median_s"]
    assert c["ratio"] == pytest.approx(ratio, rel=1e-3)


def test_step_flops_and_peak_fractions(step_run):
    result, _, _ = step_run
    c, peak = result["configs"]["quick"], result["peak_matmul"]["best_flops_per_s"]
    # The ceilings are measured before and after the configs; the faster of each is the one used.
    # So is the matmul after every repetition; the fastest of all is the peak.
    measured = result["peak_matmul"]["measured"]
    probes = c["peak_per_rep_flops_per_s"]
    assert len(probes) == c["setup"]["reps"] and all(p > 0 for p in probes)
    assert peak == max([*(m["best_flops_per_s"] for m in measured.values()), *probes])
    assert result["peak_matmul"]["torch_best_flops_per_s"] == max(
        m["torch_best_flops_per_s"] for m in measured.values()
    )
    assert result["weight_stream_bytes_per_s"] == max(
        m["stream_bytes_per_s"] for m in measured.values()
    )
    assert result["memory_read_bytes_per_s"] == max(
        m["read_bytes_per_s"] for m in measured.values()
    )
    # The floors use the faster of the two rates.
    floor_rate = max(result["weight_stream_bytes_per_s"], result["memory_read_bytes_per_s"])
    assert result["floor_bytes_per_s"] == floor_rate
    flops, s = c["flops"], c["setup"]
    assert flops["total"] == flops["sample"] + flops["teacher"] + flops["student"]
    assert s["ctx_prompt_len"] == s["context_len"] + s["prompt_len"]
    for side in ("ctxjax", "pytorch"):
        frac = c["fraction_of_peak"][side]
        assert set(frac) == {"step", "sample", "teacher", "student"}  # no FLOPs in the optimizer
        for part, value in frac.items():
            key = "total" if part == "step" else part
            expected = flops[key] / c[side][part]["median_s"] / peak
            assert value == pytest.approx(expected, rel=1e-2, abs=1e-5), (side, part)
            assert 0 < value < 1.5, (side, part)  # > 1 would mean a broken timer or FLOP count


def test_step_markdown_holds_the_measured_table(step_run):
    result, md, argv = step_run
    c, env = result["configs"]["quick"], result["environment"]
    assert f"Generated by `python scripts/bench.py {' '.join(argv)}`" in md
    assert f"Machine: {env['cpu_model']}" in md and f", {env['cores']} cores (" in md
    # The machine down to the CPU generation, where /proc/cpuinfo says it.
    cid = env["cpu_id"]
    if cid["family"] is not None:
        assert f"family {cid['family']} model {cid['model']}" in md
    assert env["measured_at"].endswith("Z")
    for lib, version in env["versions"].items():
        assert f"{lib} {version}" in md
    row = next(line for line in md.splitlines() if line.startswith("| quick: "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == f"{c['ctxjax']['step']['median_s']:.3f} s"
    assert cells[2] == f"{c['pytorch']['step']['median_s']:.3f} s"
    assert cells[3] == f"{c['ratio']:.2f}x"
    assert "## Accelerators: not measured (no GPU where this page was written)" in md


def test_step_page_regenerates_from_the_saved_result(step_run, tmp_path):
    """`step --from-json F --out-md P` measures nothing and writes the page the measuring run wrote
    from the same numbers; only the command line differs."""
    result, md, _ = step_run
    saved = tmp_path / "step.json"
    saved.write_text(json.dumps(result))
    argv = ["step", "--from-json", str(saved), "--out-md", str(tmp_path / "perf.md")]
    runpy.run_path(os.path.join(ROOT, "scripts", "bench.py"))["main"](argv)
    page = (tmp_path / "perf.md").read_text()
    assert f"Generated by `python scripts/bench.py {' '.join(argv)}`" in page
    assert "from a result `scripts/bench.py step --out` saved." in page
    assert page.splitlines()[3:] == md.splitlines()[3:]


def test_step_records_each_side_page_faults_and_system_time(step_run):
    """Both sides' timed steps carry the kernel's share, and the page shows it."""
    result, md, _ = step_run
    c = result["configs"]["quick"]
    for side in ("ctxjax", "pytorch"):
        step = c[side]["step"]
        assert isinstance(step["minor_faults_median"], int) and step["minor_faults_median"] >= 0
        assert 0 <= step["system_s_median"] <= step["median_s"] * 3, side  # 2 cores + slack
    row = next(line for line in md.splitlines() if line.startswith("| quick | ") and "MiB" in line)
    ours = c["ctxjax"]["step"]
    assert f"| {ours['minor_faults_median']} (" in row
    assert f"| {ours['system_s_median']:.2f} s |" in row


def test_host_cost_counts_the_pages_a_block_touches_first():
    """Against a known count: a fresh 64 MiB mapping written once per 4 KiB page faults in 16384
    pages (huge pages refused, so the count does not depend on the machine's THP setting)."""
    import mmap

    from experiments.bench.measure import _host_cost

    size, page = 64 << 20, 4096
    region = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)

    def touch():
        for offset in range(0, size, page):
            region[offset] = 1

    _, (faults, system_s) = _host_cost(touch)
    assert size // page <= faults <= size // page * 1.2, faults
    assert system_s >= 0
    region.close()


def test_step_reports_the_first_step_unrolled_and_scanned(step_run):
    """The first step a run waits for (compile + first call), unrolled and with the blocks scanned,
    measured and written to the page as measured."""
    result, md, _ = step_run
    c = result["configs"]["quick"]
    step, sc = c["unrolled_first"], c["scanned"]
    assert step["first_step_s"] > step["compile_s"] > 0
    # Each first step in a process of its own, not the bench's (whose warm-up would flatter it).
    pids = {step["process_id"], sc["process_id"]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert sc["first_step_s"] == pytest.approx(sc["compile_s"] + sc["first_call_s"], abs=2e-3)
    assert sc["first_steps_s"] == [sc["first_step_s"]]
    later = sc["later_calls_s"]
    assert len(later) == measure.FIRST_STEP_LATER_CALLS and all(t > 0 for t in later)
    assert sc["later_call_median_s"] == statistics.median(later)
    section = md.split("### The first step: compile + first call")[1]
    row = next(line for line in section.splitlines() if line.startswith("| quick | "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:] == [
        f"{step['compile_s']:.1f} s",
        f"{step['first_step_s']:.1f} s",
        f"{sc['compile_s']:.1f} s",
        f"{sc['first_step_s']:.1f} s",
        f"{sc['first_step_s']:.1f} s",  # the quick run measures it once
        f"{sc['later_call_median_s']:.2f} s ({min(later):.2f}-{max(later):.2f})",
    ]


def test_step_roofline_is_the_decode_floor_plus_the_matmuls_at_the_peak():
    """The floor of config b from its own numbers, by hand: 64 decode steps that each read every
    weight but the embedding table (untied: it has its own head) and the fp32 KV cache of 8 layers
    x 8 rows x 8 heads x 80 slots x 64 dims x 2, at 10 GB/s; the teacher and student FLOPs at
    200 GFLOP/s."""
    case = measure.STEP_CASES["b"]
    flops = {"sample": 1e9, "teacher": 60e9, "student": 340e9}
    roof = measure.step_roofline(case, flops, 200e9, 10e9)
    params = 41_951_744
    weights = params - 8192 * 512
    kv = 8 * 2 * 8 * 8 * 80 * 64
    decode_s = 64 * 4 * (weights + kv) / 10e9
    assert roof["decode_memory_floor_s"] == pytest.approx(decode_s, abs=1e-4)
    assert roof["sample_floor_s"] == pytest.approx(decode_s, abs=1e-4)  # memory-bound here
    assert roof["teacher_student_floor_s"] == pytest.approx(2.0, abs=1e-4)
    assert roof["step_floor_s"] == pytest.approx(decode_s + 2.0, abs=2e-4)
    # With a slow enough peak the sampling's FLOPs bound it instead.
    assert measure.step_roofline(case, flops, 0.5e9, 10e9)["sample_floor_s"] == pytest.approx(2.0)


def test_step_markdown_holds_the_floor(step_run):
    result, md, _ = step_run
    c = result["configs"]["quick"]
    roof = c["roofline"]
    assert roof["ctxjax_over_floor"] == pytest.approx(
        c["ctxjax"]["step"]["median_s"] / roof["step_floor_s"], rel=1e-9
    )
    assert "target_ratio" not in roof  # the issue sets targets for b and c only
    section = md.split("### The floor: how fast the step could run on this machine")[1]
    row = next(line for line in section.splitlines() if line.startswith("| quick | "))
    assert f"| {roof['step_floor_s']:.3f} s |" in row and row.endswith("| - |")


def test_step_markdown_holds_the_kernel_floor(step_run):
    """Each side's distance from its own library's kernel floor comes from its measured median, and
    the page shows the three floors."""
    result, md, _ = step_run
    c = result["configs"]["quick"]
    kf = c["kernel_floor"]
    floors = {k: v["step_s"] for k, v in kf["floors"].items()}
    assert floors["best"] <= min(floors["xla"], floors["torch"]) and floors["best"] > 0
    for side, lib in (("ctxjax", "xla"), ("pytorch", "torch")):
        want = c[side]["step"]["median_s"] / floors[lib]
        assert kf[f"{side}_over_own_floor"] == pytest.approx(want, rel=1e-9)
    section = md.split("### The floor with the kernels at hand")[1]
    row = next(line for line in section.splitlines() if line.startswith("| quick | "))
    assert row.startswith(f"| quick | {floors['best']:.3f} s | {floors['xla']:.3f} s |")


def test_step_markdown_shows_the_decode_step_and_the_xla_floor_verdict(step_run):
    """The page shows each library's decode step; a target whose step time lies between the best
    kernels' floor and XLA's is reachable with the best kernels and out of reach with XLA's, and a
    target above both is reachable with either (config b's numbers, faked kernel timings)."""
    import copy

    from ctxjax.config import LossConfig
    from ctxjax.model import ModelConfig
    from experiments.bench import kernels, report

    result, md, _ = step_run
    decode = result["configs"]["quick"]["kernel_floor"]["decode_step"]
    by_part = md.split("By part")[1]
    row = next(line for line in by_part.splitlines() if line.startswith("| quick | "))
    assert row.endswith(f"| {decode['xla_s'] * 1e3:.2f} / {decode['torch_s'] * 1e3:.2f} |")

    case = measure.STEP_CASES["b"]
    cfg = ModelConfig(**case.model)
    sizes = case.batch, case.prompt_len, case.context_len + case.prompt_len, case.new_tokens
    gemms = kernels.step_gemms(cfg, *sizes)
    peak, stream = 100e9, 20e9
    times = {
        g: {"xla_s": 2 * g.flops / peak, "torch_s": g.flops / peak}
        for name, counts in gemms.items()
        if name != "decode"
        for g in counts
    }
    decode_step = {"xla_s": 0.02, "torch_s": 0.01}
    flops = measure._step_flops_analytic(cfg, *sizes, LossConfig(opd="reverse_kl"))
    r = copy.deepcopy(result)
    c = r["configs"].pop("quick")
    c["flops"] = flops
    verdicts = {}
    for xla_between in (True, False):
        c = copy.deepcopy(c)
        measure._add_floors("b", c, times, decode_step, peak, stream)
        floors = {k: v["step_s"] for k, v in c["kernel_floor"]["floors"].items()}
        assert floors["best"] < floors["xla"]
        # The PyTorch way's step sets the target's step time (its median / 1.3).
        target_s = (floors["best"] + floors["xla"]) / 2 if xla_between else 2 * floors["xla"]
        c["pytorch"]["step"]["median_s"] = 1.3 * target_s
        measure._add_floors("b", c, times, decode_step, peak, stream)
        r["configs"] = {"b": c}
        page = report.step_markdown(r, "cmd").split("### The floor with the kernels at hand")[1]
        verdicts[xla_between] = next(ln for ln in page.splitlines() if ln.startswith("| b | "))
    assert (
        "(best: above: reachable; XLA's: below: out of reach with XLA's kernels)" in verdicts[True]
    )
    assert "(best: above: reachable; XLA's: above: reachable)" in verdicts[False]


def test_step_markdown_flags_load_beyond_the_bench_own(step_run):
    """The bench keeps the cores busy plus a waiting thread; only a 1-minute load above cores + 1
    says someone else shared the machine."""
    import copy

    from experiments.bench import report

    result, _, _ = step_run
    cores = result["environment"]["cores"]
    for load, flagged in ((cores + 0.9, False), (cores + 1.2, True)):
        r = copy.deepcopy(result)
        r["configs"]["quick"]["setup"]["load_avg_1min"] = [1.0, load]
        md = report.step_markdown(r, "cmd")
        assert ("The machine was shared and loaded" in md) == flagged, load


def _machine_rows(page: str) -> dict[str, list[str]]:
    """The cross-machine table's rows as cells, keyed by their machine cell + config."""
    section = page.split("### The same comparison on every machine measured")[1]
    section = section.split("## Accelerators")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return {f"{c[0]} {c[3]}": c for c in cells}


def test_step_page_lists_every_saved_machine_with_paired_ratio_ranges(step_run, tmp_path):
    """`--compare` adds earlier runs' results next to this one: each config's median ratio, the
    range of its repetitions' paired ratios, and a verdict only where every repetition agrees."""
    import copy

    result, _, _ = step_run
    other = copy.deepcopy(result)
    other["environment"].update(cpu_model="Other CPU", measured_at="2026-01-02T03:04:05Z")
    other["environment"].pop("cpu_id")  # an older result that did not record it
    c = other["configs"]["quick"]
    # Paired by repetition: 2.0 / 1.0 and 3.0 / 2.0, whatever the medians' own ratio says.
    c["ctxjax"]["step"]["times_s"], c["pytorch"]["step"]["times_s"] = [1.0, 2.0], [2.0, 3.0]
    c["ratio"] = 1.6
    c.setdefault("roofline", {})["target_ratio"] = 1.3
    saved = tmp_path / "other.json"
    saved.write_text(json.dumps(other))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(result))
    page_path = tmp_path / "perf.md"
    argv = ["step", "--from-json", str(mine), "--compare", str(saved), "--out-md", str(page_path)]
    runpy.run_path(os.path.join(ROOT, "scripts", "bench.py"))["main"](argv)
    rows = _machine_rows(page_path.read_text())
    assert len(rows) == 2
    first = next(iter(rows))  # this run's row comes first
    assert first.endswith(" quick") and "Other CPU" not in first
    theirs = rows["Other CPU quick"]
    assert theirs[1] == "2026-01-02T03:04:05Z"
    assert theirs[6] == "1.60x (1.50-2.00)"
    assert theirs[7] == "1.3x: met"  # both repetitions >= 1.3
    ours = rows[first]
    ratios = [
        r / o
        for o, r in zip(
            result["configs"]["quick"]["ctxjax"]["step"]["times_s"],
            result["configs"]["quick"]["pytorch"]["step"]["times_s"],
            strict=True,
        )
    ]
    assert (
        ours[6]
        == f"{result['configs']['quick']['ratio']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
    )
    assert ours[7] == "-"  # the quick config has no target


def test_target_verdict_claims_only_what_every_repetition_says():
    from experiments.bench.report import target_verdict

    assert target_verdict([1.31, 1.5], 1.3) == "met"
    assert target_verdict([1.29, 1.5], 1.3) == "undecided"
    assert target_verdict([1.0, 1.29], 1.3) == "NOT met"


def test_step_compare_refuses_what_is_not_a_saved_step_result(tmp_path, capsys):
    """A wrong --compare file is one line naming the flag and the file, before anything runs."""
    bad, gpu = tmp_path / "bad.json", tmp_path / "gpu.json"
    bad.write_text("{\n  oops\n}")
    gpu.write_text(json.dumps({"benchmark": "gpu"}))
    main = runpy.run_path(os.path.join(ROOT, "scripts", "bench.py"))["main"]
    for path, says in ((bad, "line 2: not JSON"), (gpu, "not a saved `step` result")):
        with pytest.raises(SystemExit) as err:
            main(["step", "--compare", str(path), "--out-md", str(tmp_path / "p.md")])
        assert err.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--compare: {path}" in last and says in last, last
    with pytest.raises(SystemExit):
        main(["step", "--compare", str(gpu)])
    assert "--compare only applies with --out-md" in capsys.readouterr().err


def test_cpu_id_reads_family_model_and_the_widest_vector_extension():
    from experiments.environment import cpu_id

    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw\n\n"
        "processor\t: 1\ncpu family\t: 99\n"
    )
    assert cpu_id(text) == {"family": 26, "model": 2, "vector_isa": "avx512f"}
    assert cpu_id("processor : 0\nflags : sse4_2 avx avx2\n") == {
        "family": None,
        "model": None,
        "vector_isa": "avx2",
    }
    assert cpu_id("") == {"family": None, "model": None, "vector_isa": None}


def test_step_rejects_an_unknown_config():
    with pytest.raises(ValueError, match=r"unknown configs \['z'\]; valid: \['a', 'b', 'c'"):
        measure.measure_step(configs="a,z")


def test_step_cases_have_the_stated_sizes():
    """The three step configs: batch 8, context 32, prompt 16 and the stated shapes."""
    from ctxjax.model import ModelConfig

    params = {}
    for name in ("a", "b", "c"):
        case = measure.STEP_CASES[name]
        assert (case.batch, case.context_len, case.prompt_len) == (8, 32, 16)
        params[name] = ModelConfig(**case.model).num_params()
    assert measure.STEP_CASES["c"].new_tokens == 32
    assert round(params["b"] / 1e6) == 42
    assert round(params["c"] / 1e6) == 135  # SmolLM2-135M, tied embeddings


# The PyTorch way against the library: the same loss and the same AdamW update.


def _scaled(model, factor: float):
    """`model` with every parameter times `factor`: logits spread over several units, so the
    distributions differ and the loss is not near 0 (random init at std 0.02 is near-uniform)."""
    from flax import nnx

    graphdef, params = nnx.split(model, nnx.Param)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * factor, params))


def test_torch_step_equals_make_distill_loss_and_its_adamw_update(tmp_path):
    import optax
    import torch
    from flax import nnx

    from ctxjax import hf
    from ctxjax.config import LossConfig, OptimConfig
    from ctxjax.model import ModelConfig, create_model
    from ctxjax.step import distill_batch, make_distill_loss, make_optimizer
    from experiments.bench import torch_step

    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_embeddings=False,
    )
    student, teacher = _scaled(create_model(cfg, 0), 4.0), _scaled(create_model(cfg, 1), 4.0)
    rng = np.random.default_rng(0)
    b, p, n = 3, 6, 5
    batch = measure._train_batch(rng, cfg.vocab_size, b, p, p + 4)  # left-padded, uneven
    resp_BxN = rng.integers(0, cfg.vocab_size, (b, n))
    resp_mask_BxN = np.ones((b, n), bool)
    resp_mask_BxN[0, 3:] = False  # a row that ended early: its tail is not counted

    ref_student = torch_step.load(hf.save_model(student, tmp_path / "student"))
    ref_teacher = torch_step.load(hf.save_model(teacher, tmp_path / "teacher")).requires_grad_(
        False
    )
    ref_loss, ref_terms = torch_step.distill_loss(
        ref_student,
        ref_teacher,
        torch_step.torch_batch(batch),
        torch.from_numpy(resp_BxN),
        torch.from_numpy(resp_mask_BxN),
        beta=0.5,
    )

    graphdef, params = nnx.split(student, nnx.Param)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    loss_fn = make_distill_loss(
        graphdef, teacher_graphdef, LossConfig(opd="reverse_kl", consistency="nca", beta=0.5)
    )
    data = distill_batch(
        {k: jnp.asarray(v) for k, v in batch.items()},
        jnp.asarray(resp_BxN, jnp.int32),
        jnp.asarray(resp_mask_BxN),
    )
    count = jnp.float32(resp_mask_BxN.sum())
    (loss, (opd_sum, nca_sum, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, teacher_params, data, jnp.float32(0.5), count
    )
    assert float(ref_terms["opd"]) > 0.05 and float(ref_terms["nca"]) > 0.05  # not a trivial 0
    assert float(loss) == pytest.approx(float(ref_loss.detach()), abs=1e-5)
    assert float(opd_sum / count) == pytest.approx(float(ref_terms["opd"]), abs=1e-5)
    assert float(nca_sum / count) == pytest.approx(float(ref_terms["nca"]), abs=1e-5)

    # One AdamW update each (warmup 0: ctxjax's first step runs at the peak rate; weight decay on
    # so that it is compared too), from the same weights.
    optim = OptimConfig(warmup_steps=0, weight_decay=0.1)
    tx = make_optimizer(optim, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    ref_loss.backward()
    ref_grads = {k: v.grad.numpy().copy() for k, v in ref_student.named_parameters()}
    torch_step.update(ref_student, torch_step.make_optimizer(ref_student, optim), optim.grad_clip)
    ref_new = {k: v.detach().numpy() for k, v in ref_student.named_parameters()}
    old, new = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(new_params))
    flat_grads = dict(nnx.to_flat_state(grads))
    assert len(new) == len(ref_new) == len(ref_grads)
    settled = total = 0
    for path, var in new.items():
        name, transpose = hf.ctxjax_to_hf_name(".".join(map(str, path)))
        as_hf = np.transpose if transpose else np.asarray  # ctxjax [in, out] -> HF [out, in]
        g, ref_g = as_hf(np.asarray(flat_grads[path][...])), ref_grads[name]
        np.testing.assert_allclose(
            g, ref_g, rtol=1e-3, atol=1e-4 * np.abs(ref_g).max(), err_msg=name
        )
        step = as_hf(np.asarray(var[...]) - np.asarray(old[path][...]))
        ref_step = ref_new[name] - as_hf(np.asarray(old[path][...]))
        # Adam's first step is lr * g / (|g| + eps) (+ decay): where |g| >> eps (1e-8) it is
        # lr * sign(g) and the two must agree to 1% of lr; where |g| is near eps, rounding in g
        # moves it by up to lr, so those few weights are not compared.
        big = np.abs(ref_g) > 1e-5
        settled, total = settled + big.sum(), total + big.size
        np.testing.assert_allclose(
            step[big], ref_step[big], atol=0.01 * optim.learning_rate, err_msg=name
        )
        assert np.abs(step[big]).min() > 0.5 * optim.learning_rate, name  # it did move
    assert settled > 0.8 * total  # most weights are compared


def test_train_bench_on_a_model_folder(tmp_path, capsys, monkeypatch):
    """`scripts/bench.py train --model PATH`: the parts split on a tiny local HF folder's weights;
    its size from transformers, the step's arguments at least student + AdamW moments + teacher;
    its first step is the first thing run after loading (as a run meets it), before any part."""
    from hf_fixtures import load_hf, make_tiny_hf

    order = []
    first_step, time_call = measure._first_step, measure._time_call
    monkeypatch.setattr(
        measure, "_first_step", lambda *a: (order.append("step"), first_step(*a))[1]
    )
    monkeypatch.setattr(
        measure, "_time_call", lambda fn, *a: (order.append(fn), time_call(fn, *a))[1]
    )
    path = make_tiny_hf("llama", tmp_path / "tiny")
    out = tmp_path / "real.json"
    main = runpy.run_path(os.path.join(ROOT, "scripts", "bench.py"))["main"]
    main(["train", "--model", path, "--batch", "2", "--new-tokens", "3", "--reps", "2",
          "--out", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert "train step on" in capsys.readouterr().out
    n_params = load_hf(path).num_parameters()
    assert r["setup"]["num_params"] == n_params
    assert (r["setup"]["batch"], r["setup"]["new_tokens"], r["setup"]["reps"]) == (2, 3, 2)
    for name in PARTS:
        row = r["timing"][name]
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["median_s"] == pytest.approx(statistics.median(row["times_s"]), abs=1e-5)
    assert r["sum_of_parts_s"] == pytest.approx(
        sum(r["timing"][k]["median_s"] for k in PARTS[1:]), abs=1e-4
    )
    assert r["step_memory"]["argument_bytes"] >= 4 * 4 * n_params  # fp32: params, mu, nu, teacher
    assert r["peak_rss_bytes"]["end"] >= r["peak_rss_bytes"]["after_load"] > 0
    assert r["setup"]["numerics"]["scan_layers"] is False
    assert r["first_step_s"] >= r["timing"]["step"]["compile_s"] > 0
    assert order[0] == "step", order[:3]
    # The layer scan (and remat) as the run would use them: recorded, and timed from the compile.
    main(["train", "--model", path, "--batch", "2", "--new-tokens", "3", "--reps", "1",
          "--scan-layers", "--remat", "--out", str(out)])  # fmt: skip
    scanned = json.loads(out.read_text())
    assert scanned["setup"]["numerics"]["scan_layers"] is True
    assert scanned["setup"]["numerics"]["remat"] is True
    assert scanned["first_step_s"] >= scanned["timing"]["step"]["compile_s"] > 0
    for flags in (["--batch", "2"], ["--scan-layers"]):  # --model's options without it do nothing
        with pytest.raises(SystemExit):
            main(["train", "--quick", *flags])
