"""Running a plan: each `RunSpec` is an ordinary `ctxjax.train.run`; a run whose `summary.json`
exists is reused, so an interrupted reproduction resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time

from ctxjax.config import load_config
from experiments.grid import RunSpec

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"
METRICS_FILE = "metrics.jsonl"


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _train(spec: RunSpec, run_dir: str, base_cache: str, progress: bool) -> float:
    """Trains one run into `run_dir`; returns its wall time (any base model it built included). A
    folder that a killed or interrupted run left (its config.json, no summary) is resumed from its
    newest intact checkpoint, not refused; a changed config is still refused by the resume check."""
    from ctxjax.run_dir import holds_run
    from ctxjax.train import run as train_run

    t0 = time.time()
    cfg = load_config(
        None, [*spec.overrides, f"train.out_dir={run_dir}", f"base.cache_dir={base_cache}"]
    )
    train_run(cfg, progress=progress, resume=bool(holds_run(run_dir)))
    seconds = time.time() - t0
    with open(os.path.join(run_dir, TIMING_FILE), "w") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def median_step_time(run_dir: str) -> float | None:
    """The median seconds a train step took (`metrics.jsonl`'s `step_time_s`), the first step left
    out (it compiles); None without at least two steps logged."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    times = [r["step_time_s"] for r in rows[1:] if "step_time_s" in r]
    return float(statistics.median(times)) if times else None


def run_all(
    specs: list[RunSpec], out_dir: str, *, base_cache: str, progress: bool = False
) -> list[dict]:
    """Runs each spec (reusing those with a summary already) and returns one record per run: the
    spec, its cell, its wall time (None if never recorded), whether it ran now, its median step
    time, and its evaluation before and after distillation with every field `ctxjax.train` wrote."""
    records = []
    for i, spec in enumerate(specs):
        run_dir = os.path.join(out_dir, spec.run_dir_name)
        ran = not os.path.exists(os.path.join(run_dir, SUMMARY_FILE))
        if ran:
            seconds = _train(spec, run_dir, base_cache, progress)
            log.info("[%d/%d] %s done in %.0fs", i + 1, len(specs), spec.name, seconds)
        summary = _read_json(os.path.join(run_dir, SUMMARY_FILE))
        timing = os.path.join(run_dir, TIMING_FILE)
        records.append(
            dict(
                spec=dataclasses.asdict(spec),
                name=spec.name,
                cell=spec.cell,
                seconds=_read_json(timing)["seconds"] if os.path.exists(timing) else None,
                ran=ran,
                step_time_s=median_step_time(run_dir),
                before=summary.get("before") or {},
                after=summary.get("after") or {},
            )
        )
    return records
