"""`scripts/bench.py train --model PATH`: the train step and its parts timed on a real checkpoint.

The same split as the `train` benchmark's Part 1 (`measure._build_ctxjax_step`: sampling, teacher,
student passes + loss, optimizer, and the whole jitted step), on an HF folder's own weights, with
the frozen starting student as the teacher (what `teacher=""` trains with) and random prompts of
its vocabulary. Also what the compiled step asks XLA for (`measure._memory`), and the process's
resident memory after loading and at the end.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time

import numpy as np

from experiments.bench.measure import (
    _build_ctxjax_step,
    _memory,
    _time_step_and_parts,
    _timing,
    _train_batch,
)


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_real(
    model: str,
    *,
    batch: int = 8,
    prompt_len: int = 64,
    ctx_prompt_len: int = 128,
    new_tokens: int = 32,
    reps: int = 3,
    seed: int = 0,
    scan_layers: bool = False,
    remat: bool = False,
) -> dict:
    """Times `reps` calls of the whole step and of each part (after a warm-up) on `model`'s weights,
    run with `numerics.scan_layers` / `numerics.remat` as given; medians, compile seconds, the first
    step (compile + first call, what a run's first step waits), XLA's memory analysis of the step
    and the peak RSS."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ctxjax import hf
    from ctxjax.config import LossConfig
    from ctxjax.model import Numerics

    t0 = time.perf_counter()
    student = hf.load_model(model, Numerics(scan_layers=scan_layers, remat=remat))
    graphdef, params = nnx.split(student, nnx.Param)
    # A separate buffer: the step donates the student's arrays, the teacher must outlive them.
    teacher = nnx.merge(graphdef, jax.tree.map(jnp.copy, params))
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_rss_bytes()
    cfg, loss_cfg = student.cfg, LossConfig()
    batch_np = _train_batch(
        np.random.default_rng(seed), cfg.vocab_size, batch, prompt_len, ctx_prompt_len
    )
    run = _build_ctxjax_step(student, teacher, batch_np, new_tokens, loss_cfg, seed, None)
    times, load_before, load_after = _time_step_and_parts(run, reps)
    timing = {name: _timing(ts, batch * new_tokens) for name, ts in times.items()}
    for name, row in timing.items():
        first = run.step_compile_s if name == "step" else run.firsts[name] - row["median_s"]
        row["compile_s"] = round(first, 3)
        row["share_of_step"] = round(row["median_s"] / timing["step"]["median_s"], 4)
    full_logits = 4 * batch * cfg.vocab_size * (2 * ctx_prompt_len + prompt_len + 3 * new_tokens)
    return {
        "setup": {
            "model": os.path.abspath(os.path.expanduser(model)),
            "architecture": dataclasses.asdict(cfg),
            "num_params": cfg.num_params(),
            "batch": batch,
            "prompt_len": prompt_len,
            "ctx_prompt_len": ctx_prompt_len,
            "new_tokens": new_tokens,
            "loss": dataclasses.asdict(loss_cfg),
            "numerics": dataclasses.asdict(student.numerics),
            "reps": reps,
            "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        },
        "load_s": round(load_s, 3),
        "timing": timing,
        "sum_of_parts_s": round(sum(timing[k]["median_s"] for k in run.parts), 5),
        "first_step_s": round(run.step_compile_s + run.step_first_call_s, 3),
        "step_memory": _memory(run.step, full_logits),
        "peak_rss_bytes": {"after_load": rss_loaded, "end": _peak_rss_bytes()},
    }


def print_real(r: dict) -> None:
    s, m, n = r["setup"], r["step_memory"], r["setup"]["numerics"]
    print(
        f"train step on {s['model']} ({s['num_params'] / 1e6:.1f}M params, vocab "
        f"{s['architecture']['vocab_size']}): batch {s['batch']}, [x] {s['prompt_len']} / [c|x] "
        f"{s['ctx_prompt_len']} slots, {s['new_tokens']} new tokens (no EOS), loss "
        f"{s['loss']['opd']}+{s['loss']['consistency']}, scan_layers={n['scan_layers']} "
        f"remat={n['remat']}; median of {s['reps']}; load avg "
        f"{s['load_avg_1min'][0]:.2f} -> {s['load_avg_1min'][1]:.2f}; weights read in "
        f"{r['load_s']:.1f} s"
    )
    print(f"  {'part':12s}{'median s':>10s}{'best s':>10s}{'share':>8s}{'compile s':>11s}")
    for name, row in r["timing"].items():
        print(
            f"  {name:12s}{row['median_s']:10.4f}{row['best_s']:10.4f}{row['share_of_step']:8.2f}"
            f"{row['compile_s']:11.2f}"
        )
    print(
        f"  sum of parts {r['sum_of_parts_s']:.4f} s; "
        f"{r['timing']['step']['tokens_per_s']:.1f} response tokens/s; first step (compile + "
        f"first call) {r['first_step_s']:.1f} s"
    )
    gib = 2**30
    print(
        f"  step memory (XLA): arguments {m['argument_bytes'] / gib:.2f} GiB, temporaries "
        f"{m['temp_bytes'] / gib:.2f} GiB; peak RSS after loading "
        f"{r['peak_rss_bytes']['after_load'] / gib:.2f} GiB, at the end "
        f"{r['peak_rss_bytes']['end'] / gib:.2f} GiB"
    )
