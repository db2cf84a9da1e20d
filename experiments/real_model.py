"""The paper's phenomenon on a real checkpoint (SmolLM2-135M-Instruct): a base-model screen of
candidate contexts, then four parts, each a set of ordinary `ctxjax.train.run` runs described by a
strict YAML plan (`configs/real_model/plan.yaml`, `load_plan`):

- `screen`: plain OPD on each context at two learning rates, with a learning curve: which contexts
  OPD degrades (greedy Harm above the base model's, or Acc_xc below it, interval excluding 0);
- `protocol`: OPD against OPD + NCA (beta 0.5 from step 0) on the contexts the screen found
  degraded, more seeds;
- `start`: when NCA should start: from step 0, the adaptive start rule (`loss.beta_schedule:
  adaptive`), and a weaker beta from step 0, all at a constant learning rate after warmup;
- `retention`: accuracy under the other contexts of a pool, before and after OPD, NCA and the
  retention anchor.

Runs go through the harness runner (`experiments.runner.run_all`): a run whose summary exists is
reused, a killed one resumes from its checkpoint, and runs with identical settings in two parts
are one run. Every run evaluates greedily (the primary endpoints, and the learning curve every
`eval_steps`); the starting and the final model are also evaluated sampled (the secondary
endpoint, Harm minus its floor). Intervals: `experiments.stats.crossed_bootstrap` (training seeds
and items resampled jointly). `run_real_model` writes `results.json`, the page's generated
section and the learning-curve PNG.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time

import numpy as np

from ctxjax.config import BaseModelConfig, RunConfig
from ctxjax.logs import configure_logging
from ctxjax.metrics import markdown_table, removability_metrics
from experiments import runner, stats
from experiments.grid import GridError, RunSpec, _check_overrides, _parse, dotted
from experiments.real_contexts import CONTEXTS_DIR

log = logging.getLogger(__name__)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(CONTEXTS_DIR, "plan.yaml")
DOC = os.path.join(_ROOT, "docs", "real_model.md")
FIGURE = os.path.join(_ROOT, "docs", "figures", "real_model_curves.png")
BEGIN, END = "<!-- real_model:begin -->", "<!-- real_model:end -->"
RESULTS_FILE = "results.json"
SAMPLED_FILE = "sampled_eval.json"  # a run's sampled evaluation of its final model
PARTS = ("screen", "protocol", "start", "retention")
DEGRADED = "degraded"  # in a part's contexts: the contexts the screen found degraded

# --------------------------------------------------------------------------------------------------
# The plan (strict YAML)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextSpec:
    """A candidate context: its prompt files (relative to the repository, or absolute); the text
    and the verifier are on every record (`experiments.real_contexts`)."""

    train: str = ""
    eval: str = ""
    kind: str = ""  # what the page calls it ("fact-bearing", "format rule", ...)


@dataclasses.dataclass(frozen=True)
class PartSpec:
    contexts: tuple[str, ...] = ()  # context names, or "degraded" (the screen's verdict)
    methods: tuple[str, ...] = ()  # names in the plan's `methods`
    seeds: tuple[int, ...] = (0,)
    learning_rates: tuple[float, ...] = (5e-5,)
    steps: int = 60
    eval_steps: tuple[int, ...] = ()  # learning-curve points (multiples of the first), 0 = before
    items: int = 16  # eval items per context (the same items in every run)
    draws: int = 2  # sampled answers per item and view (the secondary endpoint)
    # `start` only: the adaptive rule's threshold is this fraction of the reverse KL the screen's
    # OPD runs had at their first logged steps (fixed by this rule before the part runs).
    start_kl_fraction: float = 0.0
    # `retention` only: the contexts whose accuracy is measured beside the distilled one, and the
    # last `held_out` of them never drawn by the retention anchor.
    pool: tuple[str, ...] = ()
    held_out: int = 0
    max_contexts: int = 0  # > 0: at most this many contexts (the first degraded ones)


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str
    overrides: dict  # run-config overrides of every run (nested), checked against RunConfig
    contexts: dict[str, ContextSpec]
    methods: dict[str, dict]  # name -> run-config overrides
    parts: dict[str, PartSpec]  # in PARTS order
    screen_items: int  # the base-model screen: items per context
    screen_draws: int
    step_seconds: float  # the estimate's seconds per train step (before any run is timed)


@dataclasses.dataclass(frozen=True)
class _PlanFile:
    overrides: dict = dataclasses.field(default_factory=dict)
    contexts: dict = dataclasses.field(default_factory=dict)
    methods: dict = dataclasses.field(default_factory=dict)
    parts: dict = dataclasses.field(default_factory=dict)
    screen_items: int = 16
    screen_draws: int = 4
    step_seconds: float = 6.5


def _repo_path(path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(_ROOT, path)


def load_plan(path: str = PLAN) -> Plan:
    """The plan at `path`, every key checked: an unknown key, part, context or method is a
    `GridError` naming the file and the place in it."""
    from experiments.grid import _read_yaml

    raw = _parse(_PlanFile, _read_yaml(path), path, "")
    overrides = _check_overrides(raw.overrides, path, "overrides")
    contexts = {}
    for name, values in raw.contexts.items():
        spec = _parse(ContextSpec, values, path, f"contexts.{name}")
        for split in ("train", "eval"):
            if not os.path.isfile(_repo_path(getattr(spec, split))):
                raise GridError(f"{path}: contexts.{name}.{split}: no file {getattr(spec, split)}")
        contexts[name] = spec
    methods = {}
    for name, values in raw.methods.items():
        # An adaptive method's threshold comes from the screen (`start_threshold`): checked with
        # a stand-in value.
        check = values
        if isinstance(values, dict) and _is_adaptive(values):
            check = {**values, "loss": {"beta_start_kl": 1.0, **values["loss"]}}
        _check_overrides(check, path, f"methods.{name}")
        methods[name] = values
    unknown = sorted(set(raw.parts) - set(PARTS))
    if unknown:
        raise GridError(f"{path}: parts: unknown part(s) {unknown}; valid: {list(PARTS)}")
    parts = {}
    for name in [p for p in PARTS if p in raw.parts]:
        part = _parse(PartSpec, raw.parts[name], path, f"parts.{name}")
        where = f"{path}: parts.{name}"
        for c in part.contexts:
            if c not in contexts and not (c == DEGRADED and name != "screen"):
                raise GridError(f"{where}.contexts: unknown context {c!r}; have {sorted(contexts)}")
        for c in part.pool:
            if c not in contexts:
                raise GridError(f"{where}.pool: unknown context {c!r}; have {sorted(contexts)}")
        for m in part.methods:
            if m not in methods:
                raise GridError(f"{where}.methods: unknown method {m!r}; have {sorted(methods)}")
        if not (part.contexts and part.methods and part.seeds and part.learning_rates):
            raise GridError(f"{where}: needs contexts, methods, seeds and learning_rates")
        if part.eval_steps and (
            part.eval_steps[-1] != part.steps
            or any(s % part.eval_steps[0] for s in part.eval_steps)
        ):
            raise GridError(
                f"{where}.eval_steps: multiples of the first, ending at steps ({part.steps})"
            )
        if part.held_out and len(part.pool) - part.held_out < 1:
            raise GridError(f"{where}.held_out: leaves no pool context for the anchor to draw")
        parts[name] = part
    return Plan(
        path,
        overrides,
        contexts,
        methods,
        parts,
        raw.screen_items,
        raw.screen_draws,
        raw.step_seconds,
    )


# --------------------------------------------------------------------------------------------------
# Planning: one RunSpec per (context, learning rate, method, seed)
# --------------------------------------------------------------------------------------------------


def _run_overrides(plan: Plan, part: PartSpec, model: str, train: str, eval_file: str) -> list:
    """What every run of a part shares: the plan's overrides, the model and data, greedy
    evaluation of `items` with the learning curve's spacing, and the part's budget."""
    return [
        *dotted(plan.overrides),
        f"student={os.path.abspath(model)}",
        "task.name=jsonl",
        f"data.train_file={_repo_path(train)}",
        f"data.eval_file={eval_file}",
        "eval.temperature=0",
        f"eval.examples={part.items}",
        f"train.steps={part.steps}",
        f"train.eval_every={part.eval_steps[0] if part.eval_steps else 0}",
    ]


def retention_eval_file(plan: Plan, context: str, pool: tuple[str, ...], out_dir: str) -> str:
    """One eval file with the distilled context's records first (task context `ctx0`) and then
    each pool context's, in pool order (`ctx1`, ...): evaluating ctx0 measures the others as
    retention."""
    path = os.path.join(out_dir, "data", f"retention-{context}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = []
    for name in (context, *[p for p in pool if p != context]):
        with open(_repo_path(plan.contexts[name].eval)) as f:
            lines += [line for line in f if line.strip()]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)
    return path


def plan_part(
    plan: Plan,
    name: str,
    model: str,
    out_dir: str,
    degraded: list[str] | None = None,
    estimate: bool = False,
) -> list[RunSpec]:
    """The part's runs. `degraded`: the screen's degraded contexts (for a part that names
    "degraded"); a part that needs them, or an adaptive threshold from the screen, before the
    screen has finished raises ValueError. `estimate`: the runs for the budget only (an adaptive
    threshold left unset, so the screen need not have finished)."""
    part = plan.parts[name]
    contexts = []
    for c in part.contexts:
        if c == DEGRADED:
            if degraded is None:
                raise ValueError(f"part {name} runs on the screen's degraded contexts: finish it")
            contexts += [d for d in degraded if d not in contexts]
        elif c not in contexts:
            contexts.append(c)
    if part.max_contexts:
        contexts = contexts[: part.max_contexts]
    specs = []
    for context in contexts:
        spec_ctx = plan.contexts[context]
        pool = tuple(p for p in part.pool if p != context)
        eval_file = (
            retention_eval_file(plan, context, pool, out_dir)
            if name == "retention"
            else _repo_path(spec_ctx.eval)
        )
        shared = _run_overrides(plan, part, model, spec_ctx.train, eval_file)
        if name == "retention":
            shared += ["task.context=ctx0"]
        for lr in part.learning_rates:
            for method in part.methods:
                layers = [*shared, f"optim.learning_rate={lr}", *dotted(plan.methods[method])]
                if name == "retention" and part.held_out:
                    held = [f"ctx{1 + i}" for i in range(len(pool) - part.held_out, len(pool))]
                    layers.append(f"retention.held_out=[{', '.join(held)}]")
                if name == "start" and _is_adaptive(plan.methods[method]) and not estimate:
                    kl = start_threshold(plan, context, lr, model, out_dir)
                    layers.append(f"loss.beta_start_kl={kl:.6g}")
                for seed in part.seeds:
                    specs.append(
                        RunSpec(
                            task="real",
                            context=context,
                            size=f"lr{lr:g}",
                            variant=method,
                            base_seed=0,  # one given checkpoint: no base model is built
                            seed=seed,
                            task_name="jsonl",
                            overrides=(*layers, f"train.seed={seed}"),
                        )
                    )
    return specs


def _is_adaptive(method: dict) -> bool:
    return (method.get("loss") or {}).get("beta_schedule") == "adaptive"


def start_threshold(plan: Plan, context: str, lr: float, model: str, out_dir: str) -> float:
    """The adaptive rule's threshold for a context, fixed from the screen before the start part
    runs: `start_kl_fraction` times the median reverse KL of the screen's OPD runs (same context
    and learning rate) over their first 5 steps, the KL the rule's average starts from."""
    fraction = plan.parts["start"].start_kl_fraction
    if fraction <= 0:
        raise ValueError("parts.start.start_kl_fraction must be > 0 for an adaptive method")
    screen = [
        s
        for s in plan_part(plan, "screen", model, out_dir)
        if s.context == context and s.size == f"lr{lr:g}"
    ]
    kls = []
    for spec in screen:
        path = os.path.join(out_dir, spec.run_dir_name, runner.METRICS_FILE)
        if os.path.exists(os.path.join(out_dir, spec.run_dir_name, runner.SUMMARY_FILE)):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            kls += [r["reverse_kl"] for r in rows if "reverse_kl" in r and r["step"] <= 5]
    if not kls:
        raise ValueError(f"part start on {context}: the screen's OPD runs at lr {lr:g} must finish")
    return fraction * float(np.median(kls))


# --------------------------------------------------------------------------------------------------
# Evaluations beside the runs: the base-model screen and sampled evaluations
# --------------------------------------------------------------------------------------------------


def _evaluate(
    plan: Plan, model_dir: str, eval_file: str, items: int, draws: int, cache: str
) -> dict:
    """Greedy (draws 0) or sampled evaluation of `model_dir` on an eval file's first context,
    with the plan's evaluation budget and context placement, cached in `cache` (a re-run reuses
    it)."""
    from ctxjax.config import load_config
    from ctxjax.evaluate import evaluate_checkpoint

    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    cfg = load_config(None, dotted(plan.overrides))
    t0 = time.time()
    sampled = dict(temperature=1.0, samples=draws) if draws else dict(temperature=0.0)
    result = evaluate_checkpoint(
        model_dir,
        "jsonl",
        "ctx0",
        task_options={"eval_file": eval_file},
        examples=items,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        placement=cfg.data.context_placement,
        retention=False,
        with_cosine=False,
        **sampled,
    )
    result["seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(cache + ".tmp", cache)
    return result


def screen_base(plan: Plan, model: str, out_dir: str) -> dict:
    """The base model on every context of the plan: greedy, and sampled with `screen_draws`."""
    out = {}
    for name, ctx in plan.contexts.items():
        eval_file = _repo_path(ctx.eval)
        out[name] = {
            mode: _evaluate(
                plan,
                model,
                eval_file,
                plan.screen_items,
                draws,
                os.path.join(out_dir, "base", f"{name}-{mode}.json"),
            )
            for mode, draws in (("greedy", 0), ("sampled", plan.screen_draws))
        }
    return out


FOLLOW_MARGIN = 0.2


def follows(screen: dict, margin: float = FOLLOW_MARGIN) -> bool:
    """The base model follows a context: greedy Acc_xc at least `margin` above Acc_x."""
    g = screen["greedy"]
    return g["acc_xc"] - g["acc_x"] >= margin


def sampled_evals(plan: Plan, spec: RunSpec, part: PartSpec, out_dir: str) -> tuple[dict, dict]:
    """The run's starting and final model, sampled (`part.draws` per item and view)."""
    cfg = _run_config(spec)
    eval_file = cfg.data.eval_file
    key = f"{os.path.basename(eval_file)}-{part.items}x{part.draws}"
    before = _evaluate(
        plan,
        cfg.student,
        eval_file,
        part.items,
        part.draws,
        os.path.join(out_dir, "base", f"{spec.context}-{key}.json"),
    )
    run_dir = os.path.join(out_dir, spec.run_dir_name)
    after = _evaluate(
        plan,
        os.path.join(run_dir, "final"),
        eval_file,
        part.items,
        part.draws,
        os.path.join(run_dir, SAMPLED_FILE),
    )
    return before, after


def _run_config(spec: RunSpec) -> RunConfig:
    from ctxjax.config import load_config

    return load_config(None, list(spec.overrides))


# --------------------------------------------------------------------------------------------------
# Running with progress and a time limit
# --------------------------------------------------------------------------------------------------

# The estimate's cost of one run beyond its train steps, in train steps: set-up and compiles, the
# greedy evaluations (before, curve, after, cosine) and the two sampled ones. A rough guess, shown
# as one; measured run times replace it as soon as runs have finished.
RUN_OVERHEAD_STEPS = 25
# The estimate's step-time factor of a method's extra passes: NCA's with-context pass, the
# retention anchor's rollout and passes.
METHOD_FACTORS = {"consistency": 1.25, "retention": 1.7}


def estimate_seconds(plan: Plan, spec: RunSpec, part: PartSpec) -> float:
    method = plan.methods[spec.variant]
    factor = 1.0
    if (method.get("loss") or {}).get("beta", 0.5) > 0:
        factor *= METHOD_FACTORS["consistency"]
    if (method.get("retention") or {}).get("gamma", 0) > 0:
        factor *= METHOD_FACTORS["retention"]
    evals = len(part.eval_steps) + 1
    return plan.step_seconds * (part.steps * factor + RUN_OVERHEAD_STEPS + 2 * evals)


def _finished(out_dir: str, spec: RunSpec) -> bool:
    return os.path.exists(os.path.join(out_dir, spec.run_dir_name, runner.SUMMARY_FILE)) and (
        os.path.exists(os.path.join(out_dir, spec.run_dir_name, SAMPLED_FILE))
    )


def run_specs(
    plan: Plan,
    part_name: str,
    specs: list[RunSpec],
    out_dir: str,
    deadline: float | None,
    report=print,
) -> bool:
    """Runs the unfinished specs one at a time (each then evaluated sampled), reporting progress:
    runs done/left, this run's time, the estimated time left. Stops cleanly after the run during
    which `deadline` (a `time.time()`) passed; returns True when every spec is finished."""
    part = plan.parts[part_name]
    unique = list({s.run_dir_name: s for s in specs}.values())
    pending = [s for s in unique if not _finished(out_dir, s)]
    times: list[tuple[float, float]] = []  # (measured, estimated) of the runs done now
    for i, spec in enumerate(pending):
        if deadline is not None and time.time() > deadline:
            report(
                f"[{part_name}] time limit reached: {len(pending) - i} run(s) left; re-run to go on"
            )
            return False
        t0 = time.time()
        runner.run_all([spec], out_dir, base_cache=BaseModelConfig.cache_dir)
        if not os.path.isdir(os.path.join(out_dir, spec.run_dir_name, "final")):
            # Stopped by SIGTERM/SIGINT: train.run saved a checkpoint; the next call resumes it.
            report(f"[{part_name}] {spec.name} stopped by a signal; re-run to resume it")
            return False
        sampled_evals(plan, spec, part, out_dir)
        # A finished run is reused, never resumed: its last checkpoint (1.6 GB on SmolLM2, the
        # final folder's weights plus AdamW's moments) would only fill the disk across the plan.
        shutil.rmtree(os.path.join(out_dir, spec.run_dir_name, "checkpoints"), ignore_errors=True)
        took = time.time() - t0
        times.append((took, estimate_seconds(plan, spec, part)))
        left = pending[i + 1 :]
        # Estimates scaled by what the runs so far took against their own estimates.
        scale = sum(t for t, _ in times) / sum(e for _, e in times)
        remaining = scale * sum(estimate_seconds(plan, s, part) for s in left)
        report(
            f"[{part_name}] {len(unique) - len(left)}/{len(unique)} runs done "
            f"({spec.name}: {took / 60:.1f} min); {len(left)} left, about "
            f"{remaining / 3600:.2f} h"
        )
    return True


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------

ENDPOINTS = dict(
    primary=("greedy Harm", "greedy Acc_xc"),
    secondary=("sampled Harm minus its floor (two independent no-context draws)",),
    beside=("Acc_x", "Help", "BothCorrect", "Δlen", "layer cosine"),
)
METRICS = ("acc_x", "acc_xc", "harm", "help", "both_correct", "delta_len")
BOOTSTRAP = 2000
MIN_DENOMINATOR = 3  # a seed's Harm (Help) with fewer right (wrong) no-context answers: undefined


def _answers(result: dict) -> np.ndarray:
    """A result's per-answer values as [items, draws, 4]: correct_x, correct_xc, lengths."""
    shape = (result["n"], result["draws"])
    keys = ("correct_x", "correct_xc", "lengths_x", "lengths_xc")
    return np.stack([np.asarray(result[k], float).reshape(shape) for k in keys], axis=-1)


def unit_metric(answers: np.ndarray, key: str) -> float | None:
    """One metric of one seed's answers [items, draws, 4], pooled from its counts; Harm and Help
    undefined with fewer than MIN_DENOMINATOR answers in their denominator."""
    cx, cxc = answers[..., 0] > 0.5, answers[..., 1] > 0.5
    m = removability_metrics(cx, cxc, answers[..., 2], answers[..., 3])
    if key == "harm" and m["n_right_x"] < MIN_DENOMINATOR:
        return None
    if key == "help" and m["n_wrong_x"] < MIN_DENOMINATOR:
        return None
    if key == "harm_floor":
        return harm_floor(cx)
    if key == "excess_harm":
        floor = harm_floor(cx)
        harm = unit_metric(answers, "harm")
        return None if floor is None or harm is None else harm - floor
    return m[key]


def harm_floor(cx: np.ndarray) -> float | None:
    """Harm's floor under sampling: P(draw j' wrong | draw j right) over the ordered pairs of two
    different no-context draws of an item, pooled from counts; None with one draw or no right
    answer."""
    k = cx.shape[1]
    if k < 2:
        return None
    right = cx.sum(axis=1)
    pairs_right = (right * (k - 1)).sum()  # (j right, any j' != j)
    pairs_flip = (right * (k - right)).sum()  # (j right, j' wrong)
    return float(pairs_flip / pairs_right) if pairs_right >= MIN_DENOMINATOR else None


def _stat_mean(key: str):
    """The bootstrap statistic: the mean over seeds of the seed-pooled metric (undefined seeds
    left out; None when fewer than one seed is defined)."""

    def stat(units: list[np.ndarray]) -> float | None:
        values = [v for v in (unit_metric(u, key) for u in units) if v is not None]
        return float(np.mean(values)) if values else None

    return stat


def _stat_diff(key: str):
    """Paired: mean over seeds of metric(a) - metric(b), each unit a stacked pair [2, ...]."""

    def stat(units: list[np.ndarray]) -> float | None:
        values = []
        for u in units:
            a, b = unit_metric(u[0], key), unit_metric(u[1], key)
            if a is not None and b is not None:
                values.append(a - b)
        return float(np.mean(values)) if values else None

    return stat


def summarize(units: list[np.ndarray], keys=METRICS, n_boot: int = BOOTSTRAP) -> dict:
    """metric -> crossed-bootstrap summary over seeds x items (`stats.crossed_bootstrap`)."""
    return {
        k: stats.crossed_bootstrap(units, _stat_mean(k), n_boot=n_boot, seed=i)
        for i, k in enumerate(keys)
    }


def compare(a: list[np.ndarray], b: list[np.ndarray], keys=METRICS, n_boot=BOOTSTRAP) -> dict:
    """metric -> paired difference a - b (seed i of `a` with seed i of `b`; b may be one
    evaluation repeated, the base model), bootstrapped over seeds x items jointly."""
    units = [np.stack([x, y]) for x, y in zip(a, b, strict=True)]
    out = {}
    for i, k in enumerate(keys):
        out[k] = stats.crossed_bootstrap(units, _stat_diff(k), n_boot=n_boot, seed=i, item_axis=1)
        out[k]["n_defined"] = sum(
            unit_metric(u[0], k) is not None and unit_metric(u[1], k) is not None for u in units
        )
    return out


def _curve(run_dir: str, before: dict) -> dict[int, dict]:
    """step -> greedy {acc_x, acc_xc, harm} of a run: step 0 from its starting evaluation, then
    every in-run evaluation (`eval/*` in metrics.jsonl)."""
    points = {0: {k: before.get(k) for k in ("acc_x", "acc_xc", "harm")}}
    with open(os.path.join(run_dir, runner.METRICS_FILE)) as f:
        for line in f:
            row = json.loads(line)
            if "eval/acc_x" in row:
                points[row["step"]] = {k: row.get(f"eval/{k}") for k in ("acc_x", "acc_xc", "harm")}
    return points


def regime(acc_x: float, acc_xc: float) -> str:
    """How far a run internalized its context: Acc_x reached Acc_xc, or not."""
    return "internalized (Acc_x >= Acc_xc)" if acc_x >= acc_xc else "not internalized"


def collect(plan: Plan, part_name: str, specs: list[RunSpec], out_dir: str, n_boot: int) -> dict:
    """A part's finished runs aggregated per (context, learning rate): each method's per-seed
    values and per-item results, bootstrapped metrics, differences against OPD (and against the
    base model for OPD), learning curves, cosine and retention."""
    groups: dict[tuple[str, str], dict[str, list[RunSpec]]] = {}
    for s in specs:
        if _finished(out_dir, s):
            groups.setdefault((s.context, s.size), {}).setdefault(s.variant, []).append(s)
    part = plan.parts[part_name]
    out = {}
    for (context, size), by_method in groups.items():
        cell: dict = {"context": context, "learning_rate": size[2:], "methods": {}}
        base_greedy = base_sampled = None
        for method, runs in by_method.items():
            runs = sorted(runs, key=lambda s: s.seed)
            seeds, greedy, sampled, curves, cosines, retention = [], [], [], {}, [], []
            for s in runs:
                run_dir = os.path.join(out_dir, s.run_dir_name)
                with open(os.path.join(run_dir, runner.SUMMARY_FILE)) as f:
                    summary = json.load(f)
                before_s, after_s = sampled_evals(plan, s, part, out_dir)
                base_greedy, base_sampled = summary["before"], before_s
                seeds.append(s.seed)
                greedy.append(summary["after"])
                sampled.append(after_s)
                curves[s.seed] = _curve(run_dir, summary["before"])
                cosines.append(stats.metric(summary["after"], "cosine"))
                retention.append(
                    (
                        summary["before"].get("retention_mean"),
                        summary["after"].get("retention_mean"),
                    )
                )
            g_units = [_answers(r) for r in greedy]
            s_units = [_answers(r) for r in sampled]
            entry = dict(
                seeds=seeds,
                per_seed={
                    str(seed): dict(
                        greedy={k: r.get(k) for k in (*METRICS, "n_right_x", "n_wrong_x")},
                        sampled=dict(
                            harm=unit_metric(u, "harm"),
                            harm_floor=unit_metric(u, "harm_floor"),
                            excess_harm=unit_metric(u, "excess_harm"),
                        ),
                        regime=regime(r["acc_x"], r["acc_xc"]),
                        cosine=c,
                        retention_before=rb,
                        retention_after=ra,
                        per_item=dict(
                            greedy_correct_x=r["correct_x"],
                            greedy_correct_xc=r["correct_xc"],
                            sampled_correct_x=sr["correct_x"],
                            sampled_correct_xc=sr["correct_xc"],
                        ),
                    )
                    for seed, r, sr, u, c, (rb, ra) in zip(
                        seeds, greedy, sampled, s_units, cosines, retention, strict=True
                    )
                },
                greedy=summarize(g_units, n_boot=n_boot),
                sampled=summarize(s_units, ("harm", "harm_floor", "excess_harm"), n_boot),
                curves={str(k): v for k, v in curves.items()},
            )
            cell["methods"][method] = entry
            cell.setdefault("_units", {})[method] = (g_units, s_units)
        base_g, base_s = _answers(base_greedy), _answers(base_sampled)
        cell["base"] = dict(
            greedy=summarize([base_g], n_boot=n_boot),
            sampled=summarize([base_s], ("harm", "harm_floor", "excess_harm"), n_boot),
        )
        units = cell.pop("_units")
        if "opd" in units:
            g_opd, s_opd = units["opd"]
            cell["opd_vs_base"] = compare(g_opd, [base_g] * len(g_opd), n_boot=n_boot)
            cell["degraded"] = degraded_verdict(cell["opd_vs_base"])
            for method, (g, s) in units.items():
                if method == "opd":
                    continue
                common = _common_seeds(cell["methods"][method]["seeds"], cell["methods"]["opd"])
                pick = [cell["methods"][method]["seeds"].index(x) for x in common]
                pick_opd = [cell["methods"]["opd"]["seeds"].index(x) for x in common]
                cell["methods"][method]["vs_opd"] = dict(
                    greedy=compare(
                        [g[i] for i in pick], [g_opd[i] for i in pick_opd], n_boot=n_boot
                    ),
                    sampled=compare(
                        [s[i] for i in pick],
                        [s_opd[i] for i in pick_opd],
                        ("excess_harm",),
                        n_boot,
                    ),
                )
        out[f"{context}@{size}"] = cell
    return out


def _common_seeds(seeds: list[int], opd: dict) -> list[int]:
    return [s for s in seeds if s in opd["seeds"]]


def degraded_verdict(diff: dict) -> dict:
    """OPD degraded the context: greedy Harm above the base model's, or Acc_xc below it, with the
    interval excluding 0 (None: no verdict, fewer than 2 seeds defined)."""
    harm, acc = diff["harm"], diff["acc_xc"]
    if max(harm["n_defined"], acc["n_defined"]) < 2:
        return dict(degraded=None, why="fewer than 2 seeds")
    up = harm["ci95"] is not None and harm["ci95"][0] > 0
    down = acc["ci95"] is not None and acc["ci95"][1] < 0
    why = [w for w, hit in (("Harm rose", up), ("Acc_xc fell", down)) if hit]
    return dict(degraded=bool(why), why=", ".join(why) or "neither interval excludes 0")


def degraded_contexts(screen: dict) -> list[str]:
    """The contexts where OPD degraded at any learning rate of the screen."""
    return sorted(
        {c["context"] for c in screen.values() if (c.get("degraded") or {}).get("degraded")}
    )


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------

_LABELS = dict(
    acc_x="Acc_x",
    acc_xc="Acc_xc",
    harm="Harm",
    help="Help",
    both_correct="BothCorrect",
    delta_len="Δlen",
)


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    ci = stat.get("ci95")
    return f"{stat['mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{stat['mean']:.3f}"


def _show(v) -> str:
    """A table cell: preformatted text as it is, a count as digits, nothing as "-"."""
    return "-" if v is None else str(v)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def screen_table(screen: dict, kinds: dict[str, str]) -> str:
    rows = []
    for name, r in screen.items():
        g, s = r["greedy"], r["sampled"]
        rows.append(
            {
                "context": name,
                "kind": kinds.get(name, ""),
                "items": g["n"],
                "greedy Acc_x": _fmt(g["acc_x"]),
                "greedy Acc_xc": _fmt(g["acc_xc"]),
                "greedy Harm": _fmt(g["harm"]),
                "greedy Help": _fmt(g["help"]),
                f"sampled Acc_x (x{s['draws']})": _fmt(s["acc_x"]),
                "sampled Acc_xc": _fmt(s["acc_xc"]),
                "sampled Harm": _fmt(s["harm"]),
                "its floor": _fmt(harm_floor(_answers(s)[..., 0] > 0.5)),
                "follows": "yes" if follows(r) else "no",
            }
        )
    return markdown_table(rows, list(rows[0]), _show) if rows else ""


def part_table(cells: dict) -> str:
    rows = []
    for key, cell in cells.items():
        rows.append(
            {
                "": f"{key}: base",
                **{_LABELS[m]: _cell(cell["base"]["greedy"][m]) for m in METRICS},
                "sampled excess Harm": _cell(cell["base"]["sampled"]["excess_harm"]),
                "seeds": "-",
            }
        )
        for method, e in cell["methods"].items():
            rows.append(
                {
                    "": f"{key}: {method}",
                    **{_LABELS[m]: _cell(e["greedy"][m]) for m in METRICS},
                    "sampled excess Harm": _cell(e["sampled"]["excess_harm"]),
                    "seeds": ", ".join(map(str, e["seeds"])),
                }
            )
            vs = e.get("vs_opd")
            if vs:
                rows.append(
                    {
                        "": f"{key}: {method} - opd (paired)",
                        **{_LABELS[m]: _cell(vs["greedy"][m]) for m in METRICS},
                        "sampled excess Harm": _cell(vs["sampled"]["excess_harm"]),
                        "seeds": "-",
                    }
                )
        if "opd_vs_base" in cell:
            verdict = cell["degraded"]
            rows.append(
                {
                    "": f"{key}: opd - base (paired)",
                    **{_LABELS[m]: _cell(cell["opd_vs_base"][m]) for m in METRICS},
                    "sampled excess Harm": "",
                    "seeds": f"degraded: {_verdict(verdict)}",
                }
            )
    columns = ["", *_LABELS.values(), "sampled excess Harm", "seeds"]
    return markdown_table(rows, columns, _show) if rows else ""


def _verdict(v: dict) -> str:
    if v["degraded"] is None:
        return f"no verdict ({v['why']})"
    return f"{'yes' if v['degraded'] else 'no'} ({v['why']})"


def regimes_table(cells: dict) -> str:
    rows = []
    for key, cell in cells.items():
        for method, e in cell["methods"].items():
            for seed, v in e["per_seed"].items():
                rows.append(
                    {
                        "run": f"{key} {method} seed {seed}",
                        "Acc_x": _fmt(v["greedy"]["acc_x"]),
                        "Acc_xc": _fmt(v["greedy"]["acc_xc"]),
                        "Harm": _fmt(v["greedy"]["harm"]),
                        "regime": v["regime"],
                        "retention before -> after": (
                            f"{_fmt(v['retention_before'])} -> {_fmt(v['retention_after'])}"
                            if v["retention_after"] is not None
                            else "-"
                        ),
                    }
                )
    return markdown_table(rows, list(rows[0]), _show) if rows else ""


def plot_curves(parts: dict, path: str) -> str | None:
    """Greedy Acc_x and Acc_xc against the step, mean over seeds, one panel per (part, cell)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(p, k, c) for p, cells in parts.items() for k, c in cells.items()]
    if not panels:
        return None
    fig = Figure(figsize=(5 * min(len(panels), 3), 3.6 * math.ceil(len(panels) / 3)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(len(panels) / 3), min(len(panels), 3), squeeze=False).ravel()
    for ax, (part, key, cell) in zip(axes, panels, strict=False):
        for method, e in cell["methods"].items():
            steps = sorted({int(s) for c in e["curves"].values() for s in c})
            for metric, style in (("acc_x", "-"), ("acc_xc", "--")):
                ys = []
                for s in steps:
                    vals = [c[s][metric] for c in e["curves"].values() if s in c]
                    vals = [v for v in vals if v is not None]
                    ys.append(np.mean(vals) if vals else np.nan)
                ax.plot(steps, ys, style, marker="o", label=f"{method} {_LABELS[metric]}")
        ax.set_title(f"{part}: {key}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def results_markdown(results: dict, command: str) -> str:
    """The generated section of docs/real_model.md: the plan, the estimate, the screen and every
    part measured so far."""
    lines = [
        f"Generated by `{command}` from `{os.path.relpath(results['plan'], _ROOT)}` "
        f"(CPU: {results['cpu']}).",
        "",
        "**Endpoints, fixed before the runs**: primary "
        + " and ".join(ENDPOINTS["primary"])
        + "; secondary "
        + ENDPOINTS["secondary"][0]
        + "; beside them "
        + ", ".join(ENDPOINTS["beside"])
        + ". A context *degrades* when OPD's greedy Harm rises above the base model's or its "
        "Acc_xc falls below it, the paired interval excluding 0. Intervals: 95% percentile "
        f"bootstrap, {results['bootstrap']} draws, training seeds and items resampled jointly "
        "(items crossed with seeds; pairs for differences); Harm is pooled from counts within a "
        f"seed and undefined (-) below {MIN_DENOMINATOR} right no-context answers.",
        "",
        "### The plan and its budget",
        "",
        markdown_table(results["budget"], list(results["budget"][0]), _show),
        "",
        f"Estimated total: {results['estimate_hours']:.1f} h at {results['step_seconds']} s a "
        f"step, the protocol and start parts on {results['estimate_degraded']} degraded "
        "context(s) (an estimate from a quiet-VM measurement of the preset, not measured here; "
        "progress lines replace it with the runs' own times).",
        "",
        "### Base-model screen (greedy, and sampled)",
        "",
        f"Follows: greedy Acc_xc at least {FOLLOW_MARGIN} above Acc_x.",
        "",
        screen_table(results["screen"], results["kinds"]),
        "",
    ]
    for part in PARTS:
        cells = results["parts"].get(part)
        status = results["status"].get(part, "not started")
        lines += [f"### Part: {part} ({status})", ""]
        if cells:
            lines += [part_table(cells), "", regimes_table(cells), ""]
        else:
            lines += ["Nothing measured yet.", ""]
    if results.get("figure"):
        lines += [f"![learning curves]({os.path.relpath(results['figure'], os.path.dirname(DOC))})"]
    return "\n".join(lines)


def write_section(path: str, body: str) -> None:
    """Replaces the text between the generated markers of `path` (which must hold them)."""
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: no generated markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path + ".tmp", "w") as f:
        f.write(f"{head}{BEGIN}\n{body}\n{END}{tail}")
    os.replace(path + ".tmp", path)  # nothing saved is lost to a crash mid-write


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cores" if names else "unknown"
    except OSError:
        return "unknown"


def budget_rows(plan: Plan, specs_by_part: dict[str, list[RunSpec]]) -> tuple[list[dict], float]:
    rows, seen, total = [], set(), 0.0
    for name, specs in specs_by_part.items():
        part = plan.parts[name]
        new = [s for s in specs if s.run_dir_name not in seen]
        seen |= {s.run_dir_name for s in specs}
        seconds = sum(estimate_seconds(plan, s, part) for s in new)
        total += seconds
        rows.append(
            {
                "part": name,
                "contexts": ", ".join(part.contexts),
                "methods": ", ".join(part.methods),
                "seeds": len(part.seeds),
                "learning rates": ", ".join(f"{lr:g}" for lr in part.learning_rates),
                "steps": part.steps,
                "items x draws": f"{part.items} x {part.draws}",
                "runs (new)": f"{len(specs)} ({len(new)})",
                "estimate": f"{seconds / 3600:.1f} h",
            }
        )
    return rows, total / 3600


def run_real_model(
    model: str,
    out_dir: str = "runs/real_model",
    doc: str = DOC,
    *,
    plan_path: str = PLAN,
    parts: tuple[str, ...] = PARTS,
    max_hours: float | None = None,
    figure: str = FIGURE,
    command: str = "python scripts/real_model.py",
    n_boot: int = BOOTSTRAP,
    report=print,
) -> dict:
    """The base-model screen, then each of `parts` in order (a part that needs the screen's
    verdict waits for it), runs reused or resumed; stops after the run during which `max_hours`
    passed. Writes `results.json`, the page's section and the learning curves; returns the
    results."""
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"--model {model}: not an HF model folder (no config.json)")
    plan = load_plan(plan_path)
    configure_logging("ctxjax", "experiments")
    deadline = None if max_hours is None else time.time() + 3600 * max_hours
    os.makedirs(out_dir, exist_ok=True)
    screen = screen_base(plan, model, out_dir)
    status, aggregated = {}, {}
    degraded = None
    for name in [p for p in PARTS if p in plan.parts]:
        try:
            specs = plan_part(plan, name, model, out_dir, degraded)
        except ValueError as e:
            status[name] = f"waiting: {e}"
            continue
        if name in parts and (deadline is None or time.time() < deadline):
            done = run_specs(plan, name, specs, out_dir, deadline, report)
        else:
            done = all(_finished(out_dir, s) for s in specs)
        aggregated[name] = collect(plan, name, specs, out_dir, n_boot)
        finished = sum(_finished(out_dir, s) for s in {s.run_dir_name: s for s in specs}.values())
        status[name] = f"{finished}/{len({s.run_dir_name for s in specs})} runs finished"
        if name == "screen" and done:
            degraded = degraded_contexts(aggregated[name])
            status[name] += f"; degraded: {', '.join(degraded) or 'none'}"
    # The budget of the whole plan; before the screen's verdict, as if its first context degraded.
    guess = degraded if degraded is not None else list(plan.parts["screen"].contexts[:1])
    rows, hours = budget_rows(
        plan, {p: plan_part(plan, p, model, out_dir, guess, estimate=True) for p in plan.parts}
    )
    results = dict(
        plan=os.path.abspath(plan.path),
        cpu=_cpu(),
        bootstrap=n_boot,
        step_seconds=plan.step_seconds,
        budget=rows or [{"part": "-"}],
        estimate_hours=hours,
        estimate_degraded=len(guess),
        screen={k: {m: _strip(r) for m, r in v.items()} for k, v in screen.items()},
        kinds={name: c.kind for name, c in plan.contexts.items()},
        status=status,
        parts=aggregated,
        degraded=degraded,
    )
    results["figure"] = plot_curves(aggregated, figure)
    with open(os.path.join(out_dir, RESULTS_FILE + ".tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(out_dir, RESULTS_FILE + ".tmp"), os.path.join(out_dir, RESULTS_FILE))
    write_section(doc, results_markdown(results, command))
    return results


def _strip(result: dict) -> dict:
    """An evaluation's numbers and per-item answers, without its long sample texts."""
    return {k: v for k, v in result.items() if k not in ("samples", "settings")}
