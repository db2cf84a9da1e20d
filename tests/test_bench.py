"""experiments.bench: the train benchmark in its quick mode (the JSON it writes has every figure,
and the figures are sane: positive times and FLOPs, memory sizes that add up, chunking that saves
memory), and the weight-streaming rate against an exact fake clock and a numpy reference."""

import json
import statistics
import time
import types

import numpy as np
import pytest

from experiments import bench
from experiments.bench import measure

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
def test_decode_bytes_per_step_counts_every_read_weight_and_the_cache(tie):
    from ctxjax.model import ModelConfig

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
    assert measure.decode_bytes_per_step(cfg, batch=5, cache_slots=40) == 4 * (read_params + kv)


def test_weight_stream_rate_divides_the_bytes_streamed_by_the_median_call(monkeypatch):
    # A fake clock: call i of the timed loop takes (i + 1) * 0.25 s, so the median of 3 is 0.5 s.
    ticks = iter([0.0, 0.25, 1.0, 1.5, 2.0, 2.75])
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    width, mats, reps = 32, 3, 7
    rate = measure.weight_stream_rate(width=width, mats=mats, reps=reps, calls=3)
    assert rate == pytest.approx(mats * reps * (width * 4 * width * 4) / 0.5)


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
    assert "16.0 MiB per decode step" in lines[6]
