"""`results.md` (and `results.json`) of a reproduction: the headline tables by regime, the
ablations, the Harm plot, and the plain list of cells where NCA did not help."""

from __future__ import annotations

import json
import os

from experiments.plots import plot_harm_by_cell
from experiments.stats import METRICS, aggregate, where_nca_did_not_help
from experiments.tables import compare_table

REGIME_ORDER = ("nudge", "flip", "format")
HEADLINE_MODELS = ("base", "opd", "nca")
ABLATION_MODELS = ("opd", "nca", "dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0", "nca_late")


def cell_regime(task_name: str, context: str) -> str:
    """The regime of a context ("nudge", "flip", "format"), from its task with default options."""
    from ctxjax.tasks import get_task

    try:
        return get_task(task_name).regime(context)
    except (KeyError, ValueError):
        return "other"


def _intro(records: list[dict], quick: bool, seconds: float | None) -> list[str]:
    run_seconds = [r["seconds"] for r in records if r.get("seconds") is not None]
    timing = f"; the runs took {sum(run_seconds) / 60:.1f} minutes in all" if run_seconds else ""
    if len(run_seconds) < len(records):
        timing += f" ({len(records) - len(run_seconds)} runs without a recorded time)"
    lines = [
        "# Results: OPD vs OPD + NCA at CPU scale",
        "",
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
    return lines


def _rows(agg: dict, cell: str, models: tuple[str, ...]) -> list[dict]:
    variants = agg[cell]
    return [
        {"cell": cell, "model": v, **{k: variants[v][k] for k in METRICS}}
        for v in models
        if v in variants
    ]


def _headline(records: list[dict], agg: dict) -> list[str]:
    lines = [
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
    task_of = {r["cell"]: r["spec"]["task_name"] for r in records}
    by_regime: dict[str, list[dict]] = {}
    for cell in sorted(agg):
        rows = _rows(agg, cell, HEADLINE_MODELS)
        if rows:  # one task lookup per cell, not per row
            regime = cell_regime(task_of[cell], cell.split("/")[1])
            by_regime.setdefault(regime, []).extend(rows)
    order = {r: i for i, r in enumerate(REGIME_ORDER)}
    for regime in sorted(by_regime, key=lambda r: (order.get(r, len(REGIME_ORDER)), r)):
        table = compare_table(by_regime[regime], ["cell", "model", *METRICS])
        lines += [f"### {regime}", "", table, ""]
    return lines


def _ablations(agg: dict) -> list[str]:
    rows = [
        row
        for cell in sorted(agg)
        if any(x in agg[cell] for x in ("dual_opd", "sym_kl"))
        for row in _rows(agg, cell, ABLATION_MODELS)
    ]
    if not rows:
        return []
    return [
        "## Ablations and beta sweep",
        "",
        (
            "DualOPD pulls the with-context view to the teacher; SymKL is a symmetric KL "
            "between the two student views with no stop-gradient; `nca_bX` is NCA with "
            "beta = X; `nca_late` is NCA (beta 0.5) switched on at step 30 of 60."
        ),
        "",
        compare_table(rows, ["cell", "model", *METRICS]),
        "",
    ]


def _harm_figure(agg: dict, page_dir: str) -> list[str]:
    cells = [c for c in sorted(agg) if "opd" in agg[c] and "nca" in agg[c]]
    if not cells:
        return []
    figure = plot_harm_by_cell(agg, cells, os.path.join(page_dir, "figures", "harm_opd_vs_nca.png"))
    link = os.path.relpath(figure, page_dir)
    return ["## Harm by cell", "", f"![Harm, plain OPD vs NCA]({link})", ""]


def write_results(
    records: list[dict], path: str, *, quick: bool = False, seconds: float | None = None
) -> str:
    """`path` (markdown; plots next to it in `figures/`) and `results.json` beside it (the records,
    every evaluation field kept, and the aggregate)."""
    agg = aggregate(records)
    page_dir = os.path.dirname(path) or "."
    notes = where_nca_did_not_help(agg)
    lines = [
        *_intro(records, quick, seconds),
        *_headline(records, agg),
        *_ablations(agg),
        *_harm_figure(agg, page_dir),
        "## Where NCA did not help",
        "",
        *([f"- {n}" for n in notes] or ["- In every cell NCA lowered Harm and kept Acc_x."]),
        "",
    ]
    os.makedirs(page_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(records=records, aggregate=agg), f, indent=1, default=float)
    return path
