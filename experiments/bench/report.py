"""Printing the benchmarks' results (`experiments.bench.measure` measures, this module only reads
the JSON-ready dicts it returned) and writing them to a file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from experiments import environment


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
        f"{mf['floor_gb_per_s']} GB/s (the faster of weight streaming, "
        f"{mf['weight_stream_gb_per_s']}, and a plain read, {mf['read_gb_per_s']}) = "
        f"{mf['floor_ms_per_step']} ms/step "
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


STEP_ROWS = ("step", "sample", "teacher", "student", "optimizer")


def _pct(fractions: dict, name: str) -> str:
    return f"{fractions[name]:.1%}" if name in fractions else "-"


def print_step(r: dict) -> None:
    """The step comparison: per config, each part's median on both sides and its share of the
    matmul peak, then the ratio of the two step medians."""
    env, peak = r["environment"], r["peak_matmul"]["best_flops_per_s"]
    print(
        f"step: ctxjax vs the PyTorch way (torch {env['torch_threads']} threads) on "
        f"{env['cpu_model']}, {env['cores']} cores; peak fp32 matmul {peak / 1e9:.2f} GFLOP/s"
    )
    for name, c in r["configs"].items():
        s, frac = c["setup"], c["fraction_of_peak"]
        print(
            f"config {name}: {c['label']} ({s['num_params'] / 1e6:.1f}M params), batch "
            f"{s['batch']}, [x] {s['prompt_len']} / [c|x] {s['ctx_prompt_len']} slots, "
            f"{s['new_tokens']} new tokens; median of {s['reps']}; load avg "
            f"{s['load_avg_1min'][0]:.2f} -> {s['load_avg_1min'][1]:.2f}"
        )
        print(f"  {'part':10s}{'ctxjax s':>10s}{'PyTorch s':>11s}{'ctxjax':>9s}{'PyTorch':>9s}")
        for part in STEP_ROWS:
            print(
                f"  {part:10s}{c['ctxjax'][part]['median_s']:10.4f}"
                f"{c['pytorch'][part]['median_s']:11.4f}{_pct(frac['ctxjax'], part):>9s}"
                f"{_pct(frac['pytorch'], part):>9s}"
            )
        if "minor_faults_median" in c["ctxjax"]["step"]:
            ours, ref = c["ctxjax"]["step"], c["pytorch"]["step"]
            print(
                f"  page faults per step: ctxjax {_faults(ours)}, system "
                f"{ours['system_s_median']:.2f} s; PyTorch way {_faults(ref)}, system "
                f"{ref['system_s_median']:.2f} s"
            )
        print(
            f"  ratio (PyTorch way / ctxjax) {c['ratio']:.2f}x; "
            f"step {c['flops']['total'] / 1e9:.3f} GFLOP (analytic matmuls); "
            f"ctxjax compile {c['ctxjax']['step']['compile_s']:.1f} s"
        )
        if "roofline" in c:
            roof = c["roofline"]
            target = (
                f"; target {roof['target_ratio']}x needs {roof['target_step_s']:.3f} s: "
                + ("above" if roof["target_within_floor"] else "below")
                + " the floor"
                if "target_ratio" in roof
                else ""
            )
            print(
                f"  floor {roof['step_floor_s']:.3f} s (sampling {roof['sample_floor_s']:.3f} + "
                f"teacher and student {roof['teacher_student_floor_s']:.3f}); ctxjax at "
                f"{roof['ctxjax_over_floor']:.2f}x the floor{target}"
            )
        if "kernel_floor" in c:
            kf = c["kernel_floor"]
            fl = {k: v["step_s"] for k, v in kf["floors"].items()}
            print(
                f"  kernel floor {fl['best']:.3f} s (XLA's kernels {fl['xla']:.3f}, torch's "
                f"{fl['torch']:.3f}); ctxjax at {kf['ctxjax_over_own_floor']:.2f}x XLA's, the "
                f"PyTorch way at {kf['pytorch_over_own_floor']:.2f}x torch's"
            )
        if "scanned" in c:
            sc = c["scanned"]
            unrolled = _unrolled_first(c)["first_step_s"]
            each = ", ".join(f"{t:.1f}" for t in sc["first_steps_s"])
            print(
                f"  first step (compile + first call): unrolled {unrolled:.1f} s, layers scanned "
                f"{sc['first_step_s']:.1f} s, median of {each} (compile {sc['compile_s']:.1f} s; "
                f"later calls {_later_calls(sc)})"
            )


def _unrolled_first(c: dict) -> dict:
    """A config's unrolled first step: measured in a fresh process, or, in results saved before
    that, in the bench's own process (after the parts ran: warm, which is why it moved)."""
    return c.get("unrolled_first", c["ctxjax"]["step"])


def _later_calls(scanned: dict) -> str:
    """The scanned step's steady time: the median of its calls after the first, with their range
    (a result saved before they were several says its one second call)."""
    if "later_calls_s" not in scanned:
        return f"{scanned['second_call_s']:.2f} s (one call)"
    calls = scanned["later_calls_s"]
    return f"{scanned['later_call_median_s']:.2f} s ({min(calls):.2f}-{max(calls):.2f})"


def _allocator_line(env: dict) -> str:
    """The process's malloc (pages measured before it was recorded say nothing)."""
    if "allocator" not in env:
        return ""
    if env["allocator"] == "mimalloc":
        return (
            " Allocator: mimalloc, preloaded by `scripts/bench.py` as by every entry point on a "
            "CPU host (`ctxjax.host_memory`), for the whole process: both sides run on it."
        )
    return f" Allocator: {env['allocator']} (glibc's malloc on Linux)."


def _faults(step: dict) -> str:
    """A step's median page faults, with the memory they map (4 KiB pages)."""
    faults = step["minor_faults_median"]
    return f"{faults} ({faults * 4096 / 2**20:.0f} MiB)"


def machine_label(env: dict) -> str:
    """The CPU a `step` result ran on, as exactly as it recorded it: the model name, and where
    recorded the family/model numbers and the widest vector extension (which set the kernels)."""
    cid = env.get("cpu_id") or {}
    details = []
    if cid.get("family") is not None and cid.get("model") is not None:
        details.append(f"family {cid['family']} model {cid['model']}")
    if cid.get("vector_isa"):
        details.append(cid["vector_isa"])
    return env["cpu_model"] + (f" ({', '.join(details)})" if details else "")


def paired_ratios(c: dict) -> list[float]:
    """PyTorch way / ctxjax of each repetition of a config's step: the two steps of a repetition
    ran back to back, so each ratio shares that moment's machine speed."""
    ours, ref = c["ctxjax"]["step"]["times_s"], c["pytorch"]["step"]["times_s"]
    return [r / o for o, r in zip(ours, ref, strict=True)]


def target_verdict(ratios: list[float], target: float) -> str:
    """The verdict on a ratio target: met only when every repetition's ratio reaches it, NOT met
    when none does, undecided when the repetitions disagree (their range straddles it)."""
    if min(ratios) >= target:
        return "met"
    if max(ratios) < target:
        return "NOT met"
    return "undecided"


def machines_markdown(results: list[dict]) -> list[str]:
    """The comparison on every machine a saved `step` result came from, one row per config: the
    ratio depends on the CPU as much as on the step (which library's kernels it runs faster)."""
    lines = [
        "### The same comparison on every machine measured",
        "",
        "This run first, then the saved results of earlier runs (`--compare`), each as that run "
        "measured it: same configs and step, different CPUs (cloud VMs of 2 cores). Ratio: the "
        "median steps' ratio, with the range of the repetitions' paired ratios (each "
        "repetition's two steps ran back to back). A target is met when every repetition's ratio "
        "reaches it, not met when none does, undecided otherwise. The two libraries' fp32 matmul "
        "peaks say how much of a ratio is the kernels': the PyTorch way runs torch's, ctxjax "
        "XLA's.",
        "",
        "| machine | measured | fp32 peak: XLA / torch | config | ctxjax | PyTorch way "
        "| ratio (range) | target | student % of peak (target >= 55%) "
        "| first step, scanned (c: target <= 15 s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        env, peak = r["environment"], r["peak_matmul"]
        peaks = (
            f"{peak['best_flops_per_s'] / 1e9:.0f} / {peak['torch_best_flops_per_s'] / 1e9:.0f} "
            "GFLOP/s"
        )
        for name, c in r["configs"].items():
            ratios = paired_ratios(c)
            target = c.get("roofline", {}).get("target_ratio")
            verdict = "-" if target is None else f"{target}x: {target_verdict(ratios, target)}"
            first = c.get("scanned", {}).get("first_step_s")
            # Results saved before first steps ran in fresh processes measured them warm.
            where = "" if "unrolled_first" in c else " (in the bench's process)"
            lines.append(
                f"| {machine_label(env)} | {env.get('measured_at', 'not recorded')} | {peaks} "
                f"| {name} | {c['ctxjax']['step']['median_s']:.3f} s "
                f"| {c['pytorch']['step']['median_s']:.3f} s "
                f"| {c['ratio']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {verdict} "
                f"| {_pct(c['fraction_of_peak']['ctxjax'], 'student')} "
                f"| {'-' if first is None else f'{first:.1f} s{where}'} |"
            )
    return lines


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, then one line per row of cells."""
    return [
        _table_line(header),
        "|" + "---|" * len(header),
        *(_table_line(row) for row in rows),
    ]


def _table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _step_heading(r: dict, command: str) -> list[str]:
    """The page's title, its provenance, what the step is and the machine it ran on."""
    env, peak = r["environment"], r["peak_matmul"]["best_flops_per_s"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    saved = ", from a result `scripts/bench.py step --out` saved."
    return [
        "# Performance",
        "",
        f"Generated by `{command}` (do not edit by hand: rerun it)"
        + (saved if "--from-json" in command else "."),
        "",
        "## The train step against the PyTorch way",
        "",
        "One OPD + NCA step (sampling at temperature 1 with no EOS, teacher pass with the context, "
        "two student passes, full-vocabulary reverse KL + 0.5 * NCA, AdamW with clipping), ctxjax "
        "against the same step written the PyTorch way (`experiments/bench/torch_step.py`: "
        "transformers `generate`, eager torch, `torch.optim.AdamW`) on the same weights and data, "
        "timed side by side in one process (interleaved repetitions, median). Ratio = PyTorch way "
        "/ ctxjax (> 1: ctxjax is faster). Peak = the fastest of "
        f"{len(r['peak_matmul']['times_s'])} calls of one jitted fp32 "
        f"{'x'.join(map(str, r['peak_matmul']['shape_mnk']))} matmul, measured before and after "
        "the configs and 5 more calls after every repetition, the fastest kept (load can only "
        f"slow a call; this machine's speed drifts by tens of percent over minutes), "
        f"{peak / 1e9:.1f} GFLOP/s; bound = the step's analytic matmul FLOPs at that rate.",
        "",
        f"Machine: {machine_label(env)}, {env['cores']} cores ({env['jax_backend']} backend, torch "
        f"{env['torch_threads']} threads). Versions: {versions}.{_allocator_line(env)}",
        "",
    ]


def _step_comparison(r: dict) -> list[str]:
    """The step times side by side per config, and a warning naming the configs measured on a
    loaded machine."""
    env, peak = r["environment"], r["peak_matmul"]["best_flops_per_s"]
    rows, busy = [], []
    for name, c in r["configs"].items():
        s, frac = c["setup"], c["fraction_of_peak"]
        # The bench alone keeps the cores busy plus a waiting main thread: more than one runnable
        # thread beyond the cores is someone else's.
        if max(s["load_avg_1min"]) > env["cores"] + 1:
            busy.append(name)
        rows.append(
            [
                f"{name}: {c['label']}, {s['new_tokens']} new",
                f"{c['ctxjax']['step']['median_s']:.3f} s",
                f"{c['pytorch']['step']['median_s']:.3f} s",
                f"{c['ratio']:.2f}x",
                f"{c['flops']['total'] / peak:.3g} s",
                f"{frac['ctxjax']['step']:.1%}",
                f"{frac['pytorch']['step']:.1%}",
                f"{s['load_avg_1min'][0]:.1f} -> {s['load_avg_1min'][1]:.1f}",
            ]
        )
    header = ["config", "ctxjax", "PyTorch way", "ratio", "bound", "ctxjax % of peak"]
    lines = markdown_table([*header, "PyTorch way % of peak", "load avg"], rows)
    if busy:
        lines += [
            "",
            f"The machine was shared and loaded (1-minute load average above its {env['cores']} "
            f"cores + 1) while measuring config(s) {', '.join(busy)}: both sides slow down, "
            "torch's multi-threaded kernels most (its threads wait on descheduled peers), so the "
            "ratio is not the machine's. Rerun on a quiet machine for the record.",
        ]
    return lines


def _page_faults_section(r: dict) -> list[str]:
    """The kernel's share of a timed step (page faults, system time), where it was recorded."""
    if not all("minor_faults_median" in c["ctxjax"]["step"] for c in r["configs"].values()):
        return []
    rows = []
    for name, c in r["configs"].items():
        ours, ref = c["ctxjax"]["step"], c["pytorch"]["step"]
        rows.append(
            [
                name,
                _faults(ours),
                f"{ours['system_s_median']:.2f} s",
                _faults(ref),
                f"{ref['system_s_median']:.2f} s",
            ]
        )
    header = ["config", "ctxjax page faults", "ctxjax system time", "PyTorch way page faults"]
    return [
        "",
        "Each timed step follows an untimed step of its own side (not the other library's). "
        "The kernel's share of a timed step (median): minor page faults (4 KiB pages touched "
        "for the first time: under glibc's malloc XLA:CPU maps each call's temporaries "
        "afresh) and system time.",
        "",
        *markdown_table([*header, "PyTorch way system time"], rows),
    ]


def _parts_section(r: dict) -> list[str]:
    """Each part of the step, both sides, in seconds and as a share of the matmul peak."""
    rows = []
    for name, c in r["configs"].items():
        frac = c["fraction_of_peak"]
        for part in STEP_ROWS[1:]:
            rows.append(
                [
                    name,
                    part,
                    f"{c['ctxjax'][part]['median_s']:.4f}",
                    f"{c['pytorch'][part]['median_s']:.4f}",
                    _pct(frac["ctxjax"], part),
                    _pct(frac["pytorch"], part),
                ]
            )
    header = ["config", "part", "ctxjax", "PyTorch way", "ctxjax % of peak"]
    return [
        "",
        "### Where the step's time goes (median seconds; % of the matmul peak)",
        "",
        "ctxjax's parts are jitted and timed alone on the same inputs; the PyTorch way's are timed "
        "inside its step. The student part is the two student passes with the loss and backward.",
        "",
        *markdown_table([*header, "PyTorch way % of peak"], rows),
    ]


def _roofline_row(name: str, c: dict) -> list[str]:
    roof = c["roofline"]
    has_target = "target_ratio" in roof
    verdict = "-"
    if has_target:
        verdict = (
            "above the floor: reachable"
            if roof["target_within_floor"]
            else "below the floor: out of reach"
        )
    return [
        name,
        f"{c['pytorch']['step']['median_s']:.3f} s",
        f"{roof['target_ratio']}x" if has_target else "-",
        f"{roof['target_step_s']:.3f} s" if has_target else "-",
        f"{roof['sample_floor_s']:.3f} s",
        f"{roof['teacher_student_floor_s']:.3f} s",
        f"{roof['step_floor_s']:.3f} s",
        f"{c['ctxjax']['step']['median_s']:.3f} s",
        f"{roof['ctxjax_over_floor']:.2f}x",
        verdict,
    ]


def _roofline_section(r: dict) -> list[str]:
    """The floor of the step from the machine's memory bandwidth and matmul peak, per config."""
    roofs = {n: c for n, c in r["configs"].items() if "roofline" in c}
    if not roofs:
        return []
    machine = r["machine_peak_flops_per_s"]
    header = ["config", "PyTorch way", "target", "step time it needs", "floor: sampling"]
    header += ["floor: teacher + student", "floor: step", "ctxjax", "ctxjax / floor"]
    return [
        "",
        "### The floor: how fast the step could run on this machine",
        "",
        "Sampling at the larger of its memory floor (every decode step reads all weights and "
        f"the KV cache, at {r['floor_bytes_per_s'] / 1e9:.1f} GB/s: the faster of a plain "
        f"read of 1 GiB, {r['memory_read_bytes_per_s'] / 1e9:.1f} GB/s, and a loop of "
        "8-row products over 16 MiB of weights, "
        f"{r['weight_stream_bytes_per_s'] / 1e9:.1f} GB/s) and its matmul FLOPs at the peak, "
        "plus the teacher's and the student's matmul FLOPs at the peak; the optimizer and all "
        "else free. Peak here: the faster of XLA's and torch's fp32 1024^3 matmul, "
        f"{machine / 1e9:.1f} GFLOP/s (torch: "
        f"{r['peak_matmul']['torch_best_flops_per_s'] / 1e9:.1f}). A target whose step time "
        "is below the floor is out of reach on this machine for any implementation.",
        "",
        *markdown_table(
            [*header, "the target's step time"], [_roofline_row(n, c) for n, c in roofs.items()]
        ),
    ]


KERNEL_FLOOR_INTRO = (
    "The step's own matrix products (every dense layer's forward, input and weight "
    "gradient at the rows each view has, the unembedding, the prefill), each timed alone "
    "in a loop of its own (`experiments/bench/kernels.py`: operands in cache, no call "
    "overhead, the faster of two weight layouts, the fastest of 5 calls timed before and "
    "after the configs) with XLA's and with torch's kernel, and summed; the decode's "
    "one-row-per-sequence products timed as a decode step runs them, every layer's and "
    "the unembedding's in turn over the model's own set of weights (read from memory "
    "where the model outgrows the caches, not from cache), times the N - 1 decode steps; "
    "sampling at least its memory floor above, the attention's products at the peak, the "
    "optimizer at the memory floor's rate, everything else (norms, SwiGLU, RoPE, softmax, "
    "the losses, the draw) free. Best: each product with the faster library. A target "
    "whose step time is below the best column needs faster matmul kernels than this "
    "machine's, not a better step; one below XLA's column is out of reach of any step "
    "built on XLA's kernels, as ctxjax's is."
)


def _kernel_floor_row(name: str, c: dict) -> list[str]:
    kf, roof = c["kernel_floor"], c["roofline"]
    f = {k: v["step_s"] for k, v in kf["floors"].items()}
    needs = "-"
    if "target_within_floor" in kf:
        needs = f"{roof['target_step_s']:.3f} s (best: " + (
            "above: reachable" if kf["target_within_floor"] else "below: out of reach"
        )
        needs += "; XLA's: " + (
            "above: reachable)"
            if kf["target_within_xla_floor"]
            else "below: out of reach with XLA's kernels)"
        )
    return [
        name,
        f"{f['best']:.3f} s",
        f"{f['xla']:.3f} s",
        f"{f['torch']:.3f} s",
        needs,
        f"{kf['ctxjax_over_own_floor']:.2f}x",
        f"{kf['pytorch_over_own_floor']:.2f}x",
    ]


def _kernel_floor_parts_row(name: str, c: dict) -> list[str]:
    """A config's floor by part (best / XLA's / torch's kernels) and one decode step's products."""
    fl, decode = c["kernel_floor"]["floors"], c["kernel_floor"]["decode_step"]
    cells = [
        " / ".join(f"{fl[k]['parts_s'][part]:.3f}" for k in ("best", "xla", "torch"))
        for part in STEP_ROWS[1:]
    ]
    return [name, *cells, f"{decode['xla_s'] * 1e3:.2f} / {decode['torch_s'] * 1e3:.2f}"]


def _kernel_floor_section(r: dict) -> list[str]:
    """The floor of the step from its own matrix products timed with each library's kernels."""
    floors = {n: c for n, c in r["configs"].items() if "kernel_floor" in c}
    if not floors:
        return []
    header = ["config", "floor: best kernels", "XLA's kernels", "torch's kernels"]
    header += ["target's step time", "ctxjax / XLA's floor", "PyTorch way / torch's floor"]
    parts_header = ["config", "sample", "teacher", "student", "optimizer", "one decode step"]
    return [
        "",
        "### The floor with the kernels at hand",
        "",
        KERNEL_FLOOR_INTRO,
        "",
        *markdown_table(header, [_kernel_floor_row(n, c) for n, c in floors.items()]),
        "",
        "By part (seconds; best kernels / XLA's / torch's), and one decode step's products "
        "(milliseconds; XLA's / torch's):",
        "",
        *markdown_table(parts_header, [_kernel_floor_parts_row(n, c) for n, c in floors.items()]),
    ]


def _first_step_row(name: str, c: dict) -> list[str]:
    step, sc = _unrolled_first(c), c["scanned"]
    return [
        name,
        f"{step['compile_s']:.1f} s",
        f"{step['first_step_s']:.1f} s",
        f"{sc['compile_s']:.1f} s",
        f"{sc['first_step_s']:.1f} s",
        ", ".join(f"{t:.1f}" for t in sc["first_steps_s"]) + " s",
        _later_calls(sc),
    ]


def _first_step_section(r: dict) -> list[str]:
    """Compile and first-call time with the blocks unrolled and scanned, per config."""
    first = {n: c for n, c in r["configs"].items() if "scanned" in c}
    if not first:
        return []
    counted = next(iter(first.values()))["scanned"]
    fresh = (
        "Each measured in a fresh Python process, as a run meets it (in the bench's own "
        "process, after other steps had run, the first call came out several seconds "
        "faster). "
        if all("unrolled_first" in c for c in first.values())
        else ""
    )
    header = ["config", "unrolled: compile", "unrolled: first step", "scanned: compile"]
    header += ["scanned: first step", "each", "scanned: later calls"]
    return [
        "",
        "### The first step: compile + first call",
        "",
        "What a run waits for before its first step completes, with the blocks unrolled (the "
        "default) and scanned (`numerics.scan_layers=true`: one compiled block whatever the "
        "depth). " + fresh + "The unrolled step measured once; the scanned one "
        f"{len(counted['first_steps_s'])} times, each from a fresh compile (the run with the "
        "median first step shown, every first step listed); its later calls (the median of "
        f"{len(counted.get('later_calls_s', [0]))}, each on the last one's state as training "
        "makes them, with their range) show its steady time.",
        "",
        *markdown_table(header, [_first_step_row(n, c) for n, c in first.items()]),
    ]


def step_markdown(r: dict, command: str, others: Sequence[dict] = ()) -> str:
    """docs/performance.md from a `step` result: the comparison table, the part split, the machine
    and versions, the same comparison on the machines of `others` (earlier saved results), and what
    was not measured. `command` is the line that produced it."""
    sections = (
        _step_heading(r, command),
        _step_comparison(r),
        _page_faults_section(r),
        _parts_section(r),
        _roofline_section(r),
        _kernel_floor_section(r),
        _first_step_section(r),
        ["", *machines_markdown([r, *others]), "", NOT_MEASURED_SECTION],
    )
    return "\n".join(line for section in sections for line in section)


def write_text(text: str, path: str | None) -> None:
    if path:
        with open(path, "w") as fh:
            fh.write(text)


ACCELERATOR_HEADING = "## Accelerators"
NOT_MEASURED_SECTION = "\n".join(
    [
        f"{ACCELERATOR_HEADING}: not measured (no GPU where this page was written)",
        "",
        "No GPU or TPU was available when this page was generated, so nothing accelerator-side "
        "(MFU, decode tokens/s against the HBM bound, device memory) is measured here.",
        "",
    ]
)


def _split_accelerators(page: str) -> tuple[str, str | None]:
    """(the page before its accelerator section, the section: its heading to the end of the page,
    where it is the last; None when the page has none)."""
    at = page.find("\n" + ACCELERATOR_HEADING)
    return (page, None) if at < 0 else (page[: at + 1], page[at + 1 :])


def accelerator_section(page: str) -> str | None:
    """The page's accelerator section, or None when it has none."""
    return _split_accelerators(page)[1]


def with_accelerator_section(page: str, section: str) -> str:
    """`page` with its accelerator section replaced by `section` (appended if it has none)."""
    head = _split_accelerators(page)[0]
    return head.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def keep_measured_accelerators(new_page: str, old_page: str) -> str:
    """`new_page` (the step benchmark's, which says the accelerators are not measured) with
    `old_page`'s accelerator section where that one holds a measurement (`gpu --out-md` wrote it):
    regenerating the CPU page must not erase a GPU run that cannot be repeated here."""
    kept = accelerator_section(old_page)
    if kept is None or kept.startswith(f"{ACCELERATOR_HEADING}: not measured"):
        return new_page
    return with_accelerator_section(new_page, kept)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _ms(s: float) -> str:
    return f"{1e3 * s:.3f} ms"


def _gpu_profile_lines(part: str, prof: dict, top: int) -> list[str]:
    kinds = ", ".join(f"{c} {x:.1%}" for c, x in prof["categories"].items())
    lines = [
        "",
        f"One {part} call: {prof['events']} kernels, busy {prof['busy_s']:.4f} s over a "
        f"{prof['span_s']:.4f} s span (profiled; the profiler adds gaps). By kind: {kinds}.",
        "",
        "| kernel | calls | total | share |",
        "|---|---|---|---|",
    ]
    for row in prof["top"][:top]:
        lines.append(
            f"| `{row['kernel'][:80]}` | {row['calls']} | {row['total_s']:.4f} s "
            f"| {row['share']:.1%} |"
        )
    return lines


def _ab_lines(ab: dict) -> list[str]:
    """The side-by-side A/Bs of `experiments/gpu_ab.py` (its JSON) as a table."""
    lines = [
        "",
        f"### Side by side (`experiments/gpu_ab.py`, {ab['device_kind']}, jax {ab['jax']})",
        "",
        "Each pair interleaved in one process, median of "
        f"{len(ab['sampler_cast']['cast_once']['times_s'])} calls after a warm-up; each "
        "alternative's result checked against the first.",
        "",
        "| what | first | alternative | alternative / first | same result |",
        "|---|---|---|---|---|",
    ]
    sc = ab["sampler_cast"]
    lines.append(
        "| the sampler (0.5B, f32 weights, bf16 compute): weights cast once per rollout (the "
        "library) vs cast by the layers on every decode step "
        f"| {sc['cast_once']['median_s']:.4f} s "
        f"| {sc['cast_each_step']['median_s']:.4f} s | {sc['each_step_over_once']:.2f}x "
        f"| tokens {'equal' if sc['tokens_equal'] else 'DIFFER'} |"
    )
    att = ab["attention"]
    shape = "x".join(str(x) for x in att["shape_BxLxHxKxDh"])
    labels = {
        "small_transposes": "the same with the query and output transposed instead of the scores",
        "xla": "`jax.nn.dot_product_attention` (XLA)",
        "cudnn": "`jax.nn.dot_product_attention` (cuDNN)",
    }
    for name, label in labels.items():
        if name not in att:  # an A/B saved before that variant existed
            continue
        row = att[name]
        if "error" in row:
            lines.append(f"| attention fwd+bwd: ours vs {label} | refused: {row['error'][:120]} |")
            continue
        lines.append(
            f"| attention fwd+bwd, B x L x H x K x Dh = {shape}, bf16: `model._attend` vs "
            f"{label} | {att['ours']['median_s'] * 1e3:.3f} ms "
            f"| {row['median_s'] * 1e3:.3f} ms | {row['median_s'] / att['ours']['median_s']:.2f}x "
            f"| max abs difference {row['max_abs_diff_vs_ours']:.3g} (output and q, k, v "
            "gradients; every row, the left padding's too) |"
        )
    tk = ab["topk"]
    rows, vocab = tk["shape"]
    lines.append(
        f"| top-{tk['k']} of [{rows}, {vocab}] float32 (the OPD loss's): `jax.lax.top_k` vs "
        f"two-stage ({tk['chunks']} slices) | {tk['lax_top_k']['median_s'] * 1e3:.2f} ms "
        f"| {tk['two_stage']['median_s'] * 1e3:.2f} ms "
        f"| {tk['two_stage']['median_s'] / tk['lax_top_k']['median_s']:.2f}x | values equal |"
    )
    return lines


def _gpu_heading(r: dict, command: str) -> list[str]:
    """The section's title, its provenance, the device, the model and the ceilings."""
    env, dev, s = r["environment"], r["device"], r["setup"]
    m, ms = s["model"], dev["measured"]
    loss = s["loss"]
    return [
        f"{ACCELERATOR_HEADING}: one {env['device_kind']}",
        "",
        f"Generated by `{command}` (do not edit by hand: rerun it) from the JSON that "
        "`scripts/bench.py gpu` wrote on the device.",
        "",
        f"Device: {env['device_kind']} ({env['backend']}, {env['device_count']} device), jax "
        f"{env['jax']}"
        + (f", measured {env['measured_at']}" if "measured_at" in env else "")
        + (f". Host: {environment.describe(env['host'])}" if "host" in env else ".")
        + f" A random {m['family']} model of Qwen2.5-0.5B's shape "
        f"({s['num_params'] / 1e6:.1f}M params: {m['num_layers']} layers, hidden "
        f"{m['hidden_size']}, {m['num_heads']}/{m['num_kv_heads']} heads, vocab "
        f"{m['vocab_size']}), params {s['param_dtype']}, compute {s['compute_dtype']}; batch "
        f"{s['batch']}, [c|x] {s['ctx_prompt_len']} / [x] {s['prompt_len']} slots, "
        f"{s['new_tokens']} new tokens at T={s['temperature']} (no EOS), loss {loss['opd']} "
        f"(k={loss['top_k']}) + {loss['beta']} * {loss['consistency']}; median of {s['reps']} "
        f"calls. Compile {r['compile_s']:.0f} s (all the programs, in threads); run "
        f"{r['wall_s']:.0f} s.",
        "",
        "Ceilings: the datasheet's "
        + (
            "unknown"
            if dev["peak_flops"] is None
            else f"{dev['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16"
        )
        + " and "
        + (
            "unknown"
            if dev["hbm_bytes_per_s"] is None
            else f"{dev['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
        )
        + f"; measured in the same run with XLA's kernels: {ms['matmul_flops_per_s'] / 1e12:.1f} "
        f"TFLOP/s (bf16 {ms['matmul_n']}^3 matmul) and {ms['stream_bytes_per_s'] / 1e12:.2f} TB/s "
        f"(streaming {ms['stream_bytes'] / 2**30:.0f} GiB). MFU = analytic model FLOPs (matmuls; "
        "remat and the chunked loss's recompute not counted) / median time / the datasheet peak.",
    ]


GPU_TRAIN_PARTS = (
    ("sample", "sampling (`sampling.sample`)"),
    ("rest", "the rest (teacher, two student passes, loss, AdamW)"),
    ("step", "the whole step (`step.make_train_step`)"),
)


def _gpu_train_row(t: dict, name: str, label: str) -> list[str]:
    """A part of the train step: time, FLOPs, rates, and the MFU target where it applies."""
    target, rate, row = t["target"], t["rates"][name], t["timing"][name]
    goal = ""
    if name == "rest":
        verdict = "n/a" if target["met"] is None else ("met" if target["met"] else "NOT met")
        goal = f">= {target['rest_mfu_min']:.0%}: {verdict}"
    return [
        label,
        f"{row['median_s']:.4f} s",
        f"{rate['flops'] / 1e12:.2f}",
        f"{rate['flops_per_s'] / 1e12:.1f}",
        "-" if rate["mfu"] is None else f"{rate['mfu']:.1%}",
        f"{rate['of_measured_peak']:.1%}",
        goal,
    ]


def _gpu_decode(r: dict) -> list[str]:
    """One decode step against the bytes it must read at the HBM bandwidth."""
    s, d = r["setup"], r["decode"]
    read = d["bytes_per_step"]
    bound = (
        "the HBM bound unknown"
        if d["bound_step_s"] is None
        else f"the HBM bound {_ms(d['bound_step_s'])} ({d['bound_tokens_per_s']:.0f} tokens/s): "
        f"**{d['over_bound']}x the bound** (target <= {d['target']['max_over_bound']:.0f}x: "
        f"{'met' if d['target']['met'] else 'NOT met'}); {d['over_measured_bound']}x the bound "
        "at the measured streaming rate"
    )
    return [
        "",
        f"Decode: batch {d['batch']}, {d['cache_slots']} cache slots: {_ms(d['step_s'])} per "
        f"step = {d['tokens_per_s']:.0f} tokens/s (`(t(sample {s['new_tokens']}) - t(sample 1)) / "
        f"{s['new_tokens'] - 1}`). A step must read {read['total'] / 2**20:.1f} MiB (weights "
        f"{read['weights'] / 2**20:.1f} in the compute dtype, as the sampler casts them once per "
        f"rollout; KV cache {read['kv_cache'] / 2**20:.1f}); {bound}.",
    ]


def _gpu_memory_row(name: str, row: dict) -> list[str]:
    peak = row["device_peak_bytes"]
    cell = "-" if peak is None else ("<= " if row["peak_is_upper_bound"] else "") + _gib(peak)
    return [f"`{name}`", cell, _gib(row["estimate_bytes"]), _gib(row["temp_bytes"])]


def _gpu_memory(r: dict) -> list[str]:
    """Peak device memory of each compiled program beside XLA's estimate."""
    rows = [_gpu_memory_row(name, row) for name, row in r["memory"]["programs"].items()]
    return [
        "",
        "Peak device memory (`memory_stats()['peak_bytes_in_use']` after one call of each, in "
        "increasing order of XLA's estimate; `<=` where the call did not raise the running peak) "
        "of the rest by variant, where remat and the chunked loss act, and of the whole step:",
        "",
        *markdown_table(["program", "device peak", "XLA's estimate", "XLA temporaries"], rows),
    ]


def _gpu_profiles(r: dict) -> list[str]:
    """The profiled calls' top kernels, where the run was profiled (`--profile`)."""
    if not r.get("profile"):
        return []
    lines = ["", "### Where the time goes (`--profile`: one call each under the profiler)"]
    for part, prof in r["profile"].items():
        lines += _gpu_profile_lines(part, prof, top=10)
    return lines


def gpu_markdown(r: dict, ab: dict | None, command: str) -> str:
    """The accelerator section of docs/performance.md from `scripts/bench.py gpu`'s JSON (and
    `experiments/gpu_ab.py`'s, when given)."""
    train_rows = [_gpu_train_row(r["train"], name, label) for name, label in GPU_TRAIN_PARTS]
    header = ["part", "median", "TFLOP", "TFLOP/s", "MFU", "of the measured matmul rate"]
    sections = (
        _gpu_heading(r, command),
        [""],
        markdown_table([*header, "target"], train_rows),
        _gpu_decode(r),
        _gpu_memory(r),
        _gpu_profiles(r),
        [] if ab is None else _ab_lines(ab),
    )
    return "\n".join(line for section in sections for line in section) + "\n"
