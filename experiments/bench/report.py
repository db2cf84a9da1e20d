"""Printing the benchmarks' results (`experiments.bench.measure` measures, this module only reads
the JSON-ready dicts it returned) and writing them to a file."""

from __future__ import annotations

import json


def write_json(result: dict, out_json: str | None) -> None:
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(result, fh, indent=2)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_sample(result: dict) -> None:
    """The sampling benchmark as a table: ctxjax vs each transformers thread setting."""
    s = result["setup"]
    ours, per_threads = result["ctxjax"], result["transformers_by_threads"]
    best = result["transformers"]["torch_threads"]
    load_before, load_after = s["load_avg_1min"]
    print(
        f"sample: batch {s['batch']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
        "greedy, "
        f"median of {s['reps']}; load avg {load_before:.2f} -> {load_after:.2f}"
    )
    print(f"  {'':22s}{'tokens/s':>10s}{'median s':>10s}{'best s':>10s}{'compile s':>11s}")
    print(
        f"  {'ctxjax':22s}{ours['tokens_per_s']:10.1f}{ours['median_s']:10.4f}"
        f"{ours['best_s']:10.4f}{ours['compile_s']:11.2f}"
    )
    for th, row in per_threads.items():
        name = f"transformers ({th} thr)"
        if "skipped" in row:
            print(f"  {name:22s}  skipped: {row['skipped']}")
        else:
            print(
                f"  {name:22s}{row['tokens_per_s']:10.1f}{row['median_s']:10.4f}"
                f"{row['best_s']:10.4f}{'-':>11s}"
            )
    print(
        f"  speedup vs the fastest transformers setting ({best} thr): {result['speedup']}x; "
        f"identical tokens: {result['tokens_identical']}"
    )
    mf = result["memory_floor"]
    print(
        f"  memory floor: {mf['bytes_per_decode_step'] / 2**20:.1f} MiB per decode step at "
        f"{mf['weight_stream_gb_per_s']} GB/s = {mf['floor_ms_per_step']} ms/step "
        f"(ours {mf['ctxjax_ms_per_step']} ms/token step, prefill included) -> at most "
        f"{mf['floor_tokens_per_s']} tok/s, {mf['floor_speedup']}x transformers"
    )


def print_train(r: dict) -> None:
    """The train-step benchmark: time per part, FLOPs vs peak, memory of the loss."""
    t, f, s = r["time"], r["time"]["flops"], r["time"]["setup"]
    peak = r["peak_matmul"]["flops_per_s"]
    step_s = t["timing"]["step"]["median_s"]
    print(
        f"train step: model {s['model']}, batch {s['batch']}, [x] {s['prompt_len']} / [c|x] "
        f"{s['ctx_prompt_len']} slots, {s['new_tokens']} new tokens at T={s['temperature']} "
        f"(no EOS), "
        f"loss {s['loss']['opd']}+{s['loss']['consistency']}; median of {s['reps']}; "
        f"load avg {s['load_avg_1min'][0]:.2f} -> {s['load_avg_1min'][1]:.2f}"
    )
    print(f"  {'part':12s}{'median s':>10s}{'best s':>10s}{'share':>8s}{'compile s':>11s}")
    for name, row in t["timing"].items():
        print(
            f"  {name:12s}{row['median_s']:10.4f}{row['best_s']:10.4f}{row['share_of_step']:8.2f}"
            f"{row['compile_s']:11.2f}"
        )
    print(
        f"  sum of parts {t['sum_of_parts_s']:.4f} s; {t['timing']['step']['tokens_per_s']:.1f} "
        f"response tokens/s"
    )
    print(f"  peak fp32 matmul {r['peak_matmul']['shape_mnk']}: {peak / 1e9:.2f} GFLOP/s")
    for name, flops in (
        ("analytic", f["analytic"]["total"]),
        ("XLA, loop-corrected", f["xla_loop_corrected"]),
        ("XLA raw (loop body once)", f["xla_raw"]),
    ):
        print(
            f"  step FLOPs {name:26s}{flops / 1e9:9.3f} GFLOP -> {flops / step_s / 1e9:7.2f} "
            f"GFLOP/s = {flops / step_s / peak:6.1%} of peak"
        )
    m = r["memory"]
    ms = m["setup"]
    print(
        f"loss memory: vocab {ms['model']['vocab_size']}, batch {ms['batch']}, "
        f"c {ms['context_len']} + x {ms['prompt_len']} + y {ms['new_tokens']}; full fp32 logits of "
        f"the three passes {_mib(m['full_logits_bytes'])} (response slots only "
        f"{_mib(m['response_logits_bytes'])}); target temp <= {m['target_ratio']:.3f} x full"
    )
    print(
        f"  {'program':22s}{'chunk':>6s}{'temp MiB':>10s}{'args MiB':>10s}{'out MiB':>9s}"
        f"{'temp/full':>10s}"
    )
    for prog in ("train_step", "loss_only"):
        for chunk, row in m[prog].items():
            print(
                f"  {prog:22s}{chunk:>6s}{row['temp_bytes'] / 2**20:10.1f}"
                f"{row['argument_bytes'] / 2**20:10.1f}{row['output_bytes'] / 2**20:9.1f}"
                f"{row['temp_over_full_logits']:10.3f}"
            )
    print(f"  loss-only target met at chunk sizes: {m['target_met_chunks']}")
