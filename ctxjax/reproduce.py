"""The paper's comparison at CPU scale: plain OPD vs OPD + NCA, ablations and a beta sweep.

Every run is an ordinary `ctxjax.train.run` with dotted overrides; its `summary.json` is the record.
Finished runs are skipped when the script is started again, so an interrupted reproduction resumes.
`write_results` turns the summaries into `docs/results.md` with tables and plots, including a plain
list of the cells where NCA did not help.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time

import numpy as np

from ctxjax.base import MODEL_SIZES
from ctxjax.config import load_config
from ctxjax.report import compare_table

log = logging.getLogger(__name__)

# The two CPU model sizes, as overrides (one definition: ctxjax.base.MODEL_SIZES).
SIZES = {
    size: [f"model.{k}={v}" for k, v in fields.items()] for size, fields in MODEL_SIZES.items()
}
# 2000 SFT steps: at 600 the base models followed the nudges but hardly the flip rules rev/sort or
# the words format (Acc_xc <= 0.3), which left those cells measuring nothing (docs/base_models.md).
SYNTHETIC = [
    "task.name=synthetic",
    "task.options={families: [seq, max], max_len: 5}",
    "base.sft_steps=2000",
]
FROZENLAKE = [
    "task.name=frozenlake",
    "task.options={}",
    "data.max_prompt_tokens=64",
    "data.max_context_prompt_tokens=96",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24",
    "base.sft_steps=800",
]
# System-prompt QA (the paper's setting) on generated arithmetic items, the bases of
# configs/base_models.yaml: the no-context SFT answers were half wrong, so the prompt matters.
_QA_SHARED = [
    "data.max_prompt_tokens=48",
    "data.max_context_prompt_tokens=80",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24",
    "base.sft_steps=1500",
]
MCQ = [
    "task.name=mcq",
    "task.options={generated: 1500, sloppy_rate: 0.5, answer_style: text}",
    *_QA_SHARED,
]
MATH = ["task.name=math", "task.options={generated: 1000, sloppy_rate: 0.5}", *_QA_SHARED]
# The same world on the 600-step base models (the train.py default): they are less reliable with
# the context (Acc_xc about 0.9 instead of 1.0), and that is where plain OPD's Harm on nudges shows.
SYNTHETIC_600 = [
    "task.name=synthetic",
    "task.options={families: [seq, max], max_len: 5}",
    "base.sft_steps=600",
]
# (label, task overrides, context) cells of the headline table; each is crossed with both sizes.
CELLS = [
    ("synthetic", SYNTHETIC, "careful"),  # nudge
    ("synthetic", SYNTHETIC, "hint"),  # nudge
    ("synthetic", SYNTHETIC, "rev"),  # flip
    ("synthetic", SYNTHETIC, "sort"),  # flip
    ("synthetic", SYNTHETIC, "words"),  # format
    ("synthetic", SYNTHETIC, "pirate"),  # format
    ("frozenlake", FROZENLAKE, "tips"),  # nudge, planning
    ("mcq", MCQ, "system"),  # nudge, system-prompt QA
    ("math", MATH, "system"),  # nudge, system-prompt QA
    ("synthetic600", SYNTHETIC_600, "careful"),  # nudge, 600-step base
    ("synthetic600", SYNTHETIC_600, "hint"),  # nudge, 600-step base
]
ABLATION_CELLS = [("synthetic", "careful", "medium"), ("synthetic", "rev", "medium")]
VARIANTS = {
    "opd": ["loss.beta=0.0"],
    "nca": ["loss.beta=0.5", "loss.consistency=nca"],
    "dual_opd": ["loss.beta=0.5", "loss.consistency=dual_opd"],
    "sym_kl": ["loss.beta=0.5", "loss.consistency=sym_kl"],
    "nca_b0.1": ["loss.beta=0.1", "loss.consistency=nca"],
    "nca_b1.0": ["loss.beta=1.0", "loss.consistency=nca"],
    # The anchor switched on halfway: in the flip regime NCA from step 0 pins the with-context view
    # to the no-context answer before OPD has taught the student anything.
    "nca_late": [
        "loss.beta=0.5",
        "loss.consistency=nca",
        "loss.beta_schedule=delayed",
        "loss.beta_start_step=30",
    ],
}
METRICS = ("acc_x", "acc_xc", "harm", "both_correct", "delta_len", "retention_mean")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    task: str
    context: str
    size: str
    variant: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task}-{self.context}-{self.size}-{self.variant}-s{self.seed}"

    @property
    def cell(self) -> str:
        return f"{self.task}/{self.context}/{self.size}"

    @property
    def run_dir_name(self) -> str:
        """The name plus a hash of the overrides: a run made under other settings (another base
        model's SFT budget, other steps) is never mistaken for this one and reused."""
        digest = hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


def plan(
    *, quick: bool = False, seeds: int = 2, steps: int = 60, examples: int = 96
) -> list[RunSpec]:
    """Every run of the reproduction, headline first."""
    common = [
        f"train.steps={steps}",
        f"eval.examples={examples}",
        "train.checkpoint_every=0",
        "train.log_every=20",
    ]
    if quick:  # a CI-sized smoke version of the same pipeline: one cell, one seed, tiny budgets
        common = [
            "train.steps=6",
            "eval.examples=8",
            "train.checkpoint_every=0",
            "base.sft_steps=40",
            "base.sft_examples=2000",
            "data.batch_size=8",
            "rollout.max_new_tokens=8",
            "eval.max_new_tokens=8",
        ]
        cells, sizes, seed_list = [CELLS[0]], ["small"], [0]
    else:
        cells, sizes, seed_list = CELLS, list(SIZES), list(range(seeds))
    by_task = {task: over for task, over, _ in CELLS}
    specs = []

    def add(task, context, size, variant, seed):
        over = (
            *common,
            *by_task[task],
            f"task.context={context}",
            *SIZES[size],
            *VARIANTS[variant],
            f"train.seed={seed}",
        )
        specs.append(RunSpec(task, context, size, variant, seed, tuple(over)))

    for task, _, context in cells:
        for size in sizes:
            for seed in seed_list:
                for variant in ("opd", "nca"):
                    add(task, context, size, variant, seed)
    if not quick:
        for task, context, size in ABLATION_CELLS:
            for variant in ("dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0", "nca_late"):
                add(task, context, size, variant, 0)
    return specs


def run_all(
    specs: list[RunSpec], out_dir: str, *, base_cache: str, progress: bool = False
) -> list[dict]:
    """Runs each spec (skipping those with a summary already) and returns their records."""
    from ctxjax.train import run as train_run

    records = []
    for i, spec in enumerate(specs):
        run_dir = os.path.join(out_dir, spec.run_dir_name)
        path = os.path.join(run_dir, "summary.json")
        ran = not os.path.exists(path)
        if ran:
            t0 = time.time()
            cfg = load_config(
                None, [*spec.overrides, f"train.out_dir={run_dir}", f"base.cache_dir={base_cache}"]
            )
            train_run(cfg, progress=progress)
            seconds = time.time() - t0
            with open(os.path.join(run_dir, "timing.json"), "w") as f:
                json.dump({"seconds": seconds}, f)
            log.info("[%d/%d] %s done in %.0fs", i + 1, len(specs), spec.name, seconds)
        with open(path) as f:
            summary = json.load(f)
        timing = os.path.join(run_dir, "timing.json")
        seconds = json.load(open(timing))["seconds"] if os.path.exists(timing) else None
        records.append(
            dict(
                spec=dataclasses.asdict(spec),
                name=spec.name,
                cell=spec.cell,
                seconds=seconds,
                ran=ran,
                before=_metrics(summary.get("before")),
                after=_metrics(summary.get("after")),
            )
        )
    return records


def _metrics(result: dict | None) -> dict:
    result = result or {}
    out = {k: result.get(k) for k in METRICS}
    out["layer_cosine"] = result.get("layer_cosine")
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values))


def aggregate(records: list[dict]) -> dict:
    """cell -> variant -> metric -> (mean, std, n) over seeds; plus the base model as 'base'."""
    table: dict = {}
    for rec in records:
        cell, variant = rec["cell"], rec["spec"]["variant"]
        table.setdefault(cell, {}).setdefault(variant, []).append(rec["after"])
        if variant == "opd":
            table[cell].setdefault("base", []).append(rec["before"])
    out = {}
    for cell, variants in table.items():
        out[cell] = {}
        for variant, rows in variants.items():
            out[cell][variant] = {
                k: (*_mean_std([r.get(k) for r in rows]), len(rows)) for k in METRICS
            }
    return out


def _fmt(mean_std_n) -> str:
    mean, std, n = mean_std_n
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


REGIME_ORDER = ("nudge", "flip", "format")


def cell_regime(cell: str) -> str:
    """The regime of a "task/context/size" cell's context, from the task with default options."""
    from ctxjax.tasks import get_task

    label, context = cell.split("/")[:2]
    names = [
        o.split("=", 1)[1]
        for lbl, over, _ in CELLS
        if lbl == label
        for o in over
        if o.startswith("task.name=")
    ]
    try:
        return get_task(names[0] if names else label).regime(context)
    except (KeyError, ValueError):
        return "other"


def where_nca_did_not_help(agg: dict, tol: float = 0.02) -> list[str]:
    """Cells where NCA's Harm was not lower than OPD's, or NCA cost accuracy without context."""
    notes = []
    for cell, variants in sorted(agg.items()):
        if "opd" not in variants or "nca" not in variants:
            continue
        opd, nca = variants["opd"], variants["nca"]
        if not nca["harm"][0] < opd["harm"][0] - tol:
            notes.append(
                f"{cell}: Harm {nca['harm'][0]:.3f} with NCA vs {opd['harm'][0]:.3f} with "
                f"plain OPD (no reduction larger than {tol})"
            )
        if nca["acc_x"][0] < opd["acc_x"][0] - 0.05:
            notes.append(
                f"{cell}: Acc_x {nca['acc_x'][0]:.3f} with NCA vs {opd['acc_x'][0]:.3f} with "
                f"plain OPD (NCA held back what OPD learned)"
            )
        if nca["acc_xc"][0] < opd["acc_xc"][0] - 0.1:
            notes.append(
                f"{cell}: Acc_xc {nca['acc_xc'][0]:.3f} with NCA vs {opd['acc_xc'][0]:.3f} with "
                f"plain OPD (the anchor pulled the with-context view onto a no-context answer "
                f"that was still wrong: the student stopped following the context)"
            )
    return notes


def write_results(
    records: list[dict], path: str, *, quick: bool = False, seconds: float | None = None
) -> str:
    """`docs/results.md` (tables, plots next to it in `figures/`)."""
    agg = aggregate(records)
    fig_dir = os.path.join(os.path.dirname(path) or ".", "figures")
    os.makedirs(fig_dir, exist_ok=True)
    lines = ["# Results: OPD vs OPD + NCA at CPU scale", ""]
    run_seconds = [r["seconds"] for r in records if r.get("seconds") is not None]
    timing = f"; the runs took {sum(run_seconds) / 60:.1f} minutes in all" if run_seconds else ""
    if len(run_seconds) < len(records):
        timing += f" ({len(records) - len(run_seconds)} runs without a recorded time)"
    lines += [
        f"Written by `python scripts/reproduce.py{' --quick' if quick else ''}` from "
        f"{len(records)} runs{timing}, counting any base model a run had to build first"
        + (f" (this invocation: {seconds / 60:.1f} minutes)" if seconds else "")
        + ". Each cell: a tiny base model trained here to follow the task's contexts, then "
        "distilled on one context with plain OPD (`beta=0`) or OPD + NCA (`beta=0.5`); "
        "mean ± std over seeds. Evaluation samples answers at temperature 1.",
        "",
    ]
    if quick:
        lines += [
            "**Quick mode**: a CI smoke run with tiny budgets; the numbers say nothing about the "
            "method.",
            "",
        ]
    lines += [
        "## Headline",
        "",
        (
            "By regime (`ctxjax/tasks/synthetic.py`): a *nudge* context keeps the right answer and "
            "makes the model reliable, a *flip* rule changes the right answer, a *format* "
            "instruction changes its form. `base` is the model before distillation. Harm is "
            "conditioned on the questions answered right without the context: where Acc_x is "
            "near 0 (most flip and format cells) it rests on a handful of questions and says "
            "little; read Acc_xc there."
        ),
        "",
    ]
    by_regime: dict[str, list[dict]] = {}
    for cell, variants in sorted(agg.items()):
        rows = [
            {"cell": cell, "model": v, **{k: _fmt(variants[v][k]) for k in METRICS}}
            for v in ("base", "opd", "nca")
            if v in variants
        ]
        if rows:  # one task lookup per cell, not per row
            by_regime.setdefault(cell_regime(cell), []).extend(rows)
    for regime in sorted(
        by_regime,
        key=lambda r: (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r),
    ):
        lines += [
            f"### {regime}",
            "",
            compare_table(by_regime[regime], ["cell", "model", *METRICS]),
            "",
        ]
    extra = [
        {"cell": cell, "model": v, **{k: _fmt(variants[v][k]) for k in METRICS}}
        for cell, variants in sorted(agg.items())
        for v in ("opd", "nca", "dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0", "nca_late")
        if v in variants and any(x in variants for x in ("dual_opd", "sym_kl"))
    ]
    if extra:
        lines += [
            "## Ablations and beta sweep",
            "",
            (
                "DualOPD pulls the with-context view to the teacher; SymKL is a symmetric KL "
                "between the two student views with no stop-gradient; `nca_bX` is NCA with beta = X; "
                "`nca_late` is NCA (beta 0.5) switched on at step 30 of 60."
            ),
            "",
            compare_table(extra, ["cell", "model", *METRICS]),
            "",
        ]
    figure = _plot_harm(agg, os.path.join(fig_dir, "harm_opd_vs_nca.png"))
    if figure:
        lines += [
            "## Harm by cell",
            "",
            f"![Harm, plain OPD vs NCA]({os.path.relpath(figure, os.path.dirname(path) or '.')})",
            "",
        ]
    notes = where_nca_did_not_help(agg)
    lines += ["## Where NCA did not help", ""]
    lines += (
        [f"- {n}" for n in notes] if notes else ["- In every cell NCA lowered Harm and kept Acc_x."]
    )
    lines.append("")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(records=records, aggregate=agg), f, indent=1, default=float)
    return path


def _plot_harm(agg: dict, path: str) -> str | None:
    cells = [c for c in sorted(agg) if "opd" in agg[c] and "nca" in agg[c]]
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(cells))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cells)), 4))
    for offset, variant, label in ((-0.2, "opd", "plain OPD"), (0.2, "nca", "OPD + NCA")):
        mean = [agg[c][variant]["harm"][0] for c in cells]
        std = [agg[c][variant]["harm"][1] for c in cells]
        ax.bar(x + offset, mean, 0.4, yerr=std, label=label)
    ax.set_xticks(x, cells, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Harm = P(wrong with c | right without c)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reproduce(
    out_dir: str = "runs/reproduce",
    results_path: str = "docs/results.md",
    *,
    quick: bool = False,
    seeds: int = 2,
) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.time()
    specs = plan(quick=quick, seeds=seeds)
    log.info("%d runs planned", len(specs))
    # The full run shares base models with `scripts/train.py` and `scripts/build_base.py`; the quick
    # one keeps its throw-away tiny ones beside its runs.
    base_cache = os.path.join(out_dir, "base") if quick else "runs/base"
    records = run_all(specs, out_dir, base_cache=base_cache)
    # An invocation that only rewrites the page from finished runs has no time worth reporting.
    seconds = time.time() - t0 if any(r["ran"] for r in records) else None
    return write_results(records, results_path, quick=quick, seconds=seconds)
