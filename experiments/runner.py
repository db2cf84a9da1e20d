"""Running a plan: each `RunSpec` is an ordinary `ctxjax.train.run`; a run whose `summary.json`
exists is reused, so an interrupted reproduction resumes where it stopped."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import statistics
import time

from ctxjax.config import load_config
from experiments.grid import RunSpec

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
TIMING_FILE = "timing.json"
METRICS_FILE = "metrics.jsonl"
GREEDY_FILE = "greedy_eval.json"  # a run's greedy evaluation after distillation


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


def _eval_target(cfg: dict) -> tuple[str, str, dict]:
    """(task name, context, task options) that a run's config tree (`config.json`) evaluates: for
    the user's records (jsonl), their eval file with the records' own contexts."""
    task = cfg["task"]
    if task["name"] == "jsonl":
        return "jsonl", "", {"eval_file": cfg["data"]["eval_file"]}
    return task["name"], task["context"], dict(task["options"])


def greedy_eval(model_dir: str, cache: str, cfg: dict) -> dict:
    """The greedy evaluation (temperature 0: one deterministic answer per item and view) of
    `model_dir` on a run's task, context and eval settings (`cfg`: its config.json tree), cached
    in `cache` so that a re-run reuses it. Only the two views: no retention, no layer cosine."""
    from ctxjax.evaluate import evaluate_checkpoint

    if os.path.exists(cache):
        return _read_json(cache)
    task_name, context, options = _eval_target(cfg)
    ev = cfg["eval"]
    t0 = time.time()
    result = evaluate_checkpoint(
        model_dir,
        task_name,
        context,
        task_options=options,
        examples=ev["examples"],
        max_new_tokens=ev["max_new_tokens"],
        temperature=0.0,
        batch_size=ev["batch_size"],
        seed=ev["seed"],
        placement=cfg["data"]["context_placement"],
        retention=False,
        with_cosine=False,
    )
    result["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    with open(cache + f".{os.getpid()}.tmp", "w") as f:
        json.dump(result, f)
    os.replace(cache + f".{os.getpid()}.tmp", cache)  # parallel workers may write it at once
    return result


def _base_greedy_cache(student: str, cfg: dict) -> str:
    """Where the starting model's greedy evaluation is kept: beside it (its runs share it), keyed
    by everything the evaluation depends on."""
    key = hashlib.sha256(
        json.dumps(
            dict(
                target=_eval_target(cfg),
                eval=cfg["eval"],
                placement=cfg["data"]["context_placement"],
            ),
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    return os.path.join(student, "ctxjax_eval", f"greedy-{key}.json")


def greedy_before_after(run_dir: str) -> tuple[dict, dict]:
    """A finished run's greedy evaluations: of its starting model and of its final model."""
    summary = _read_json(os.path.join(run_dir, SUMMARY_FILE))
    cfg, student = summary["config"], summary["student"]
    before = greedy_eval(student, _base_greedy_cache(student, cfg), cfg)
    after = greedy_eval(os.path.join(run_dir, "final"), os.path.join(run_dir, GREEDY_FILE), cfg)
    return before, after


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


def _finished(run_dir: str) -> bool:
    """A summary with the final evaluation, or the exported final folder: `ctxjax.train.run` writes
    summary.json when it starts (to keep the starting evaluation for a resume), so a summary alone
    is also what a killed run leaves."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.exists(path):
        return False
    return "after" in _read_json(path) or os.path.isdir(os.path.join(run_dir, "final"))


def _base_group(spec: RunSpec, base_cache: str) -> str:
    """The cache key of the base model a spec's run starts from: its runs share one build."""
    from ctxjax.base import base_key

    cfg = load_config(None, [*spec.overrides, f"base.cache_dir={base_cache}"])
    return base_key(
        cfg.task.name, dict(cfg.task.options), cfg.model, cfg.base, cfg.base.seed, cfg.numerics
    )


def _interleave_bases(specs: list[RunSpec], base_cache: str) -> list[RunSpec]:
    """The specs reordered round-robin over their base models (plan order within each): parallel
    workers then start on different bases and build them side by side, instead of one waiting on
    the lock of the base another is building."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(_base_group(spec, base_cache), []).append(spec)
    queues = list(groups.values())
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


COMPILATION_CACHE = "jax_cache"  # under the reproduction's folder


def use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path`: the runs of a grid compile the same programs
    (a train step, a sampler, an evaluation per shape), so all but the first of each load it
    instead of compiling it again, across runs and worker processes. The same program either way,
    so results do not change. Set before this process compiles anything."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _complete(spec: RunSpec, run_dir: str, base_cache: str, progress: bool, greedy: bool):
    """Trains the run unless it has finished, then (`greedy`) evaluates it greedily; returns the
    training's wall time, None when it had finished already."""
    seconds = None if _finished(run_dir) else _train(spec, run_dir, base_cache, progress)
    if greedy:
        greedy_before_after(run_dir)
    return seconds


def _run_pending(
    specs: list[RunSpec], out_dir: str, base_cache: str, progress: bool, jobs: int, greedy: bool
) -> None:
    """Completes every spec that has no summary yet (or, `greedy`, no greedy evaluation): in this
    process (`jobs` 1) or in `jobs` worker processes. A run's randomness comes from its config
    alone, so neither the order nor the worker changes its result; base models are built once
    (`ctxjax.base` locks each build). The first failure stops the queue and is raised here; runs
    already finished keep their summaries and are reused when the reproduction is run again."""
    dirs = {s.run_dir_name: os.path.join(out_dir, s.run_dir_name) for s in specs}
    pending = [
        s
        for s in specs
        if not _finished(dirs[s.run_dir_name])
        or (greedy and not os.path.exists(os.path.join(dirs[s.run_dir_name], GREEDY_FILE)))
    ]

    def done(i: int, spec: RunSpec, seconds: float | None) -> None:
        what = f"done in {seconds:.0f}s" if seconds is not None else "evaluated greedily"
        log.info("[%d/%d] %s %s", i + 1, len(pending), spec.name, what)

    if jobs <= 1:  # in this process, whose JAX settings are its entry point's to choose
        for i, spec in enumerate(pending):
            done(i, spec, _complete(spec, dirs[spec.run_dir_name], base_cache, progress, greedy))
        return
    # spawn, not fork: the parent has imported JAX, whose runtime threads do not survive a fork.
    context = multiprocessing.get_context("spawn")
    cache = os.path.join(out_dir, COMPILATION_CACHE)
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=use_compilation_cache, initargs=(cache,)
    ) as pool:
        futures = {
            pool.submit(_complete, s, dirs[s.run_dir_name], base_cache, False, greedy): s
            for s in _interleave_bases(pending, base_cache)
        }
        try:
            for i, future in enumerate(concurrent.futures.as_completed(futures)):
                done(i, futures[future], future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_all(
    specs: list[RunSpec],
    out_dir: str,
    *,
    base_cache: str,
    progress: bool = False,
    jobs: int = 1,
    greedy: bool = False,
) -> list[dict]:
    """Runs each spec (reusing those with a summary already; `jobs` > 1: that many at a time, each
    in its own process) and returns one record per run, in plan order: the spec, its cell, its wall
    time (None if never recorded), whether it ran now, its median step time, and its evaluation
    before and after distillation with every field `ctxjax.train` wrote; `greedy`: also the
    starting and the final model's greedy evaluations (`before_greedy`, `after_greedy`)."""
    ran = {s.run_dir_name for s in specs if not _finished(os.path.join(out_dir, s.run_dir_name))}
    _run_pending(specs, out_dir, base_cache, progress, jobs, greedy)
    records = []
    for spec in specs:
        run_dir = os.path.join(out_dir, spec.run_dir_name)
        summary = _read_json(os.path.join(run_dir, SUMMARY_FILE))
        timing = os.path.join(run_dir, TIMING_FILE)
        record = dict(
            spec=dataclasses.asdict(spec),
            name=spec.name,
            cell=spec.cell,
            seconds=_read_json(timing)["seconds"] if os.path.exists(timing) else None,
            ran=spec.run_dir_name in ran,
            step_time_s=median_step_time(run_dir),
            before=summary.get("before") or {},
            after=summary.get("after") or {},
        )
        if greedy:
            record["before_greedy"], record["after_greedy"] = greedy_before_after(run_dir)
        records.append(record)
    return records
