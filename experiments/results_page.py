"""`results.md` and `results.json` of a reproduction, and the README's "Results" block: per cell,
whether plain OPD degraded it and the paired NCA - OPD differences over base models (greedy, the
primary endpoint, then sampled, with Harm's floor), the two counts (by direction and by
Holm-corrected significance), the headline tables by regime, the ablations, the Harm plot, and the
plain list of cells where NCA did not help.

Every page is text generated from the saved document (`results.json`: the records, the machine,
the time): `rewrite_results` regenerates them from it, and a test checks that the README's block is
what the saved document generates.
"""

from __future__ import annotations

import json
import math
import os

from experiments.environment import describe
from experiments.plots import plot_harm_by_cell
from experiments.stats import (
    ALPHA,
    FLOOR_METRICS,
    INTERVAL_METHOD,
    LOWERS,
    METRICS,
    MIN_PAIRS,
    NO_DEGRADATION,
    PAIRED_METRICS,
    PRIMARY_ENDPOINT,
    RETENTION_METRICS,
    Comparison,
    aggregate,
    cell_comparisons,
    direction_count,
    significance_count,
    where_nca_did_not_help,
)
from experiments.tables import Stat, compare_table, format_cell

REGIME_ORDER = ("nudge", "flip", "format")
HEADLINE_MODELS = ("base", "opd", "nca")
ABLATION_MODELS = ("opd", "nca", "dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0", "nca_late")
HARM_FIGURE = os.path.join("figures", "harm_opd_vs_nca.png")
README_BEGIN = (
    "<!-- results:begin (generated from docs/results.json by experiments/results_page.py) -->"
)
README_END = "<!-- results:end -->"


def cell_regime(task_name: str, context: str) -> str:
    """The regime of a context ("nudge", "flip", "format"), from its task with default options."""
    from ctxjax.tasks import get_task

    try:
        return get_task(task_name).regime(context)
    except (KeyError, ValueError):
        return "other"


# --------------------------------------------------------------------------------------------------
# Text, from the saved document alone
# --------------------------------------------------------------------------------------------------


def protocol(records: list[dict]) -> str:
    """How the records' evaluations were made, read from the records themselves."""
    afters = [r["after"] for r in records if r["after"]]
    if any("mode" not in a for a in afters):
        return (
            "**Old protocol**: these records predate independent sampling of the two views (the "
            "views of an item shared their sampling noise, which pushes Harm towards 0 wherever "
            "the views agree and so flatters NCA), and they were made with one base model per "
            "cell. Help and the counts behind Harm were not kept, and an undefined Harm (no item "
            "right without the context) was saved as 0, so a Harm of 0 here may be undefined. "
            "Regenerate with `python scripts/reproduce.py`."
        )
    modes = sorted({a["mode"] for a in afters})
    coupled = any(a.get("coupled_views") for a in afters)
    draws = sorted({a["draws"] for a in afters if a.get("draws") is not None})
    return (
        f"Evaluation: {', '.join(modes)}"
        + (f", {'/'.join(map(str, draws))} draw(s) per item and view" if draws else "")
        + (", views coupled (common random numbers)" if coupled else ", views drawn independently")
        + "."
    )


def _seeds(records: list[dict]) -> str:
    bases = sorted({r["spec"].get("base_seed", 0) for r in records})
    seeds = sorted({r["spec"]["seed"] for r in records})
    return f"base seeds {bases} x distillation seeds {seeds}"


def _intro(doc: dict) -> list[str]:
    records, seconds = doc["records"], doc.get("seconds")
    run_seconds = [r["seconds"] for r in records if r.get("seconds") is not None]
    timing = f"; the runs took {sum(run_seconds) / 60:.1f} minutes in all" if run_seconds else ""
    if len(run_seconds) < len(records):
        timing += f" ({len(records) - len(run_seconds)} runs without a recorded time)"
    lines = [
        "# Results: OPD vs OPD + NCA at CPU scale",
        "",
        f"Written by `python scripts/reproduce.py{' --quick' if doc.get('quick') else ''}"
        f"{f' --jobs {jobs}' if (jobs := doc.get('jobs') or 1) > 1 else ''}` from "
        f"{len(records)} runs ({_seeds(records)}){timing}, counting any base model a run had to "
        "build first"
        + (f" (this invocation: {seconds / 60:.1f} minutes)" if seconds else "")
        + ".",
        "",
        protocol(records),
        "",
        "Each cell: a tiny base model trained here to follow the task's contexts, then distilled "
        f"on one context with plain OPD (`beta=0`) or OPD + NCA (`beta=0.5`). Cells: mean "
        f"[{INTERVAL_METHOD}]; a mean alone where one base defines it; '-' where undefined (e.g. "
        f"Harm on fewer than {MIN_PAIRS} pairs right without the context), left out of means. "
        "`bases` counts the base models a row's values rest on. `cosine` is the per-layer hidden "
        "cosine between the views, mean over the transformer blocks.",
        "",
        f"{PRIMARY_ENDPOINT} Sampled evaluations also answer without the context twice, "
        "independently: `harm_floor` = P(second no-context answer wrong | first right), the Harm "
        "a model shows against itself with no context involved, and `excess_harm` = Harm - floor; "
        "'-' where the records predate that measurement (not recorded, not 0).",
        "",
        describe(doc.get("environment")),
        "",
    ]
    if doc.get("quick"):
        lines += [
            "**Quick mode**: a CI smoke run with tiny budgets; the numbers say nothing about the "
            "method.",
            "",
        ]
    return lines


# The paper's count: direction, one seed, its Table of 12 settings.
PAPER_COUNT = "11 of 12"


def _count_line(comparisons: dict) -> str:
    """The two counts, named apart, beside the paper's, and what they support."""
    down, defined = direction_count(comparisons)
    lowered, judged = significance_count(comparisons)
    skipped = sum(c.verdict == NO_DEGRADATION for c in comparisons.values())
    direction = (
        f"**By direction** (the paper's kind of count, its {PAPER_COUNT}): NCA's mean Harm is "
        f"below plain OPD's in **{down} of {defined}** cells with the difference defined."
    )
    if not judged:
        return (
            f"{direction} **By significance**: no cell has a verdict (it needs plain OPD to have "
            "degraded the cell and at least 2 base models defining the Harm difference)."
        )
    support = (
        "In no cell does the corrected test tell NCA's effect on Harm apart from the variation "
        "between base models: a direction count is not evidence here."
        if lowered == 0
        else f'Only those {lowered} support "NCA lowers Harm"; the direction count alone does not.'
    )
    return (
        f"{direction} **By significance**: NCA lowers Harm in **{lowered} of {judged}** cells, "
        f"the cells where plain OPD degraded the cell and at least 2 bases define the difference, "
        f"by the t-test over bases with Holm's correction across those {judged} (p < {ALPHA:.2f})"
        + (f"; {skipped} cell(s) had no degradation to fix" if skipped else "")
        + f". {support}"
    )


def _paired_table(comparisons: dict, floor: bool = False) -> str:
    """Per cell: plain OPD against the base model (degradation), then NCA - OPD over the same base
    models, the Holm-corrected p of the Harm difference and the verdict; Help beside Harm."""
    keys = (*PAIRED_METRICS, "excess_harm") if floor else PAIRED_METRICS
    rows = [
        {
            "cell": cell,
            "bases": c.diff["harm"].n,
            "opd-base harm": c.degradation_harm,
            "base-opd acc_xc": c.degradation_acc_xc,
            "harm opd": c.opd["harm"],
            "harm nca": c.nca["harm"],
            **{f"{k} nca-opd": c.diff[k] for k in keys},
            "holm p": c.p_holm,
            "verdict": c.verdict,
        }
        for cell, c in sorted(comparisons.items())
    ]
    columns = [
        "cell",
        "bases",
        "opd-base harm",
        "base-opd acc_xc",
        "harm opd",
        "harm nca",
        *(f"{k} nca-opd" for k in keys),
        "holm p",
        "verdict",
    ]
    return compare_table(rows, columns)


PAIRED_NOTE = (
    "Columns: `opd-base harm` and `base-opd acc_xc` say whether plain OPD degraded the cell (a "
    "positive mean: it did); `harm opd` / `harm nca` and the `nca-opd` differences are over the "
    "base models where the Harm difference is defined (`bases`); `holm p` is the two-sided t-test "
    "of the Harm difference over bases, Holm-corrected across the cells with a verdict; the "
    f"verdict is {LOWERS!r} only where that p is below {ALPHA:.2f}, '{NO_DEGRADATION}' where "
    "plain OPD degraded neither Harm nor Acc_xc (lower Harm there, with lower Help, means the "
    "context became inert, not robust), '-' with fewer than 2 bases."
)


def _rows(agg: dict, cell: str, models: tuple[str, ...]) -> list[dict]:
    variants = agg[cell]
    return [
        {"cell": cell, "model": v, "bases": variants[v]["acc_x"].n, **variants[v]}
        for v in models
        if v in variants
    ]


def _task_name(spec: dict) -> str:
    """The task a run's cell is built on (records before `task_name` was kept: its override)."""
    if "task_name" in spec:
        return spec["task_name"]
    names = [o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("task.name=")]
    return names[-1] if names else spec["task"]


def _regimes(records: list[dict]) -> dict[str, str]:
    """cell -> its regime, one task lookup per cell (not per record or row)."""
    task_of = {r["cell"]: _task_name(r["spec"]) for r in records}
    return {cell: cell_regime(task, cell.split("/")[1]) for cell, task in task_of.items()}


def _block_rows(agg: dict, having: tuple[str, ...], models: tuple[str, ...]) -> list[dict]:
    """The rows of `models` of every cell where one of the variants `having` ran (a block's
    table: the ablations, the retention anchor)."""
    return [
        row
        for cell in sorted(agg)
        if any(v in agg[cell] for v in having)
        for row in _rows(agg, cell, models)
    ]


def _last_override(spec: dict, key: str) -> str:
    """The value a run's last `key=` override set ("?" if none did)."""
    values = [o.split("=", 1)[1] for o in spec.get("overrides", []) if o.startswith(f"{key}=")]
    return values[-1] if values else "?"


def _headline(records: list[dict], agg: dict) -> list[str]:
    lines = [
        "## By regime",
        "",
        "By regime (`ctxjax/tasks/synthetic.py`): a *nudge* context keeps the right answer and "
        "makes the model reliable, a *flip* rule changes the right answer, a *format* instruction "
        "changes its form. `base` is the model before distillation, over its base seeds. Harm is "
        "conditioned on the answers right without the context: where Acc_x is near 0 it rests on "
        "few of them.",
        "",
    ]
    regime_of = _regimes(records)
    by_regime: dict[str, list[dict]] = {}
    for cell in sorted(agg):
        rows = _rows(agg, cell, HEADLINE_MODELS)
        if rows:
            by_regime.setdefault(regime_of[cell], []).extend(rows)
    order = {r: i for i, r in enumerate(REGIME_ORDER)}
    for regime in sorted(by_regime, key=lambda r: (order.get(r, len(REGIME_ORDER)), r)):
        table = compare_table(by_regime[regime], ["cell", "model", "bases", *SAMPLED_METRICS])
        lines += [f"### {regime}", "", table, ""]
    return lines


def _ablations(agg: dict) -> list[str]:
    rows = _block_rows(agg, ("dual_opd", "sym_kl"), ABLATION_MODELS)
    if not rows:
        return []
    return [
        "## Ablations and beta sweep",
        "",
        "DualOPD pulls the with-context view to the teacher; SymKL is a symmetric KL between the "
        "two student views with no stop-gradient; `nca_bX` is NCA with beta = X; `nca_late` is NCA "
        "(beta 0.5) switched on partway (configs/grids/reproduce.yaml).",
        "",
        compare_table(rows, ["cell", "model", "bases", *METRICS]),
        "",
    ]


# The retention anchor's variants (configs/grids/reproduce.yaml `retention:`), in table order.
RETENTION_MODELS = ("base", "ret_opd", "ret_nca", "ret_opd_anchor", "ret_nca_anchor")
# The flip regime run long (`flip:`): OPD must first internalize the rule for the comparison.
FLIP_MODELS = ("base", "opd", "nca", "nca_late", "dual_opd")
# The Acc_x plain OPD must reach before the flip comparison tests the paper's claim.
FLIP_ACC_X = 0.8


def _retention(records: list[dict]) -> list[str]:
    agg = aggregate(records, RETENTION_METRICS)
    rows = _block_rows(agg, RETENTION_MODELS[1:], RETENTION_MODELS)
    if not rows:
        return []
    return [
        "## Retention anchor (beyond the paper)",
        "",
        "Each step also samples answers under another context of the task, drawn from the anchor's "
        "pool, and adds gamma x reverse KL(student || frozen teacher) on them (`retention.gamma`). "
        "`ret_opd` / `ret_nca`: OPD / OPD + NCA without the anchor; `*_anchor`: with it (gamma "
        "0.5). All four hold out the same contexts from the pool, so `retention_pool` is the "
        "accuracy under the contexts the anchor draws and `retention_held_out` under the ones it "
        "never saw. `step_time_s`: the median train step (the first, compiling, left out), on "
        "whatever load the machine had.",
        "",
        compare_table(rows, ["cell", "model", "bases", *RETENTION_METRICS]),
        "",
    ]


def _flip(records: list[dict], agg: dict) -> list[str]:
    """The flip cells of the `flip:` block: every variant run there, and whether plain OPD reached
    FLIP_ACC_X (stated from the numbers, whichever way they came out)."""
    regime_of = _regimes(records)
    # A cell's runs share their step count.
    steps_of = {r["cell"]: _last_override(r["spec"], "train.steps") for r in records}
    cells = [
        c
        for c in sorted(agg)
        if regime_of[c] == "flip" and any(v in agg[c] for v in ("nca_late", "dual_opd"))
    ]
    if not cells:
        return []
    lines = [
        "## Flip regime",
        "",
        "A flip rule changes the right answer, so the paper's claim is about a student that has "
        f"internalized the rule: the comparison of NCA from step 0 (`nca`), NCA switched on "
        f"partway (`nca_late`) and DualOPD tests it only where plain OPD's Acc_x reached "
        f"{FLIP_ACC_X}. Whether it did, per cell:",
        "",
    ]
    for cell in cells:
        opd = agg[cell].get("opd", {}).get("acc_x")
        if opd is None or math.isnan(opd.mean):
            reached = "plain OPD has no Acc_x here"
        else:
            where = (
                "lies above"
                if opd.lo >= FLIP_ACC_X
                else "lies below"
                if opd.hi < FLIP_ACC_X
                else "includes"
            )
            reached = f"plain OPD's Acc_x {format_cell(opd)}: its interval {where} {FLIP_ACC_X}"
        lines.append(f"- {cell} ({steps_of[cell]} steps): {reached}.")
    lines += [
        "",
        compare_table(
            [row for c in cells for row in _rows(agg, c, FLIP_MODELS)],
            ["cell", "model", "bases", *METRICS],
        ),
        "",
    ]
    return lines


def _figure_cells(agg: dict) -> list[str]:
    return [c for c in sorted(agg) if "opd" in agg[c] and "nca" in agg[c]]


# The greedy evaluation's columns: it has one answer per item and view, no retention, no cosine
# (and no floor: its second no-context answer would be the first).
GREEDY_METRICS = tuple(m for m in METRICS if m not in ("cosine", "retention_mean"))
# The sampled tables' columns: every metric, Harm's floor and the excess over it.
SAMPLED_METRICS = (*METRICS, *FLOOR_METRICS)
# The sampled paired differences: Harm above each model's floor beside Harm.
FLOOR_PAIRED = (*PAIRED_METRICS, "excess_harm")


def greedy_records(records: list[dict]) -> list[dict]:
    """The records that hold greedy evaluations (`experiments.runner.run_all(greedy=True)`), each
    with its greedy evaluations in place of its sampled ones."""
    return [
        {**r, "before": r["before_greedy"], "after": r["after_greedy"]}
        for r in records
        if r.get("after_greedy")
    ]


def _comparison_section(title: str, comparisons: dict, intro: str, floor: bool) -> list[str]:
    return [
        title,
        "",
        intro,
        "",
        _count_line(comparisons),
        "",
        _paired_table(comparisons, floor),
        "",
        PAIRED_NOTE,
        "",
    ]


GREEDY_INTRO = (
    "The starting and final models answering greedily (temperature 0): one deterministic answer "
    "per item and view, so Harm has no sampling floor (a model whose two views agree has Harm 0)."
)
SAMPLED_INTRO = (
    "The same models sampled: independent draws per view (and a second, independent no-context "
    "draw for Harm's floor where recorded). `excess_harm nca-opd` is the difference of Harm "
    "above each model's own floor."
)


def _greedy_tables(greedy: list[dict]) -> list[str]:
    agg = aggregate(greedy, GREEDY_METRICS)
    rows = [row for cell in sorted(agg) for row in _rows(agg, cell, HEADLINE_MODELS)]
    return [
        "## Greedy evaluation, every metric",
        "",
        compare_table(rows, ["cell", "model", "bases", *GREEDY_METRICS]),
        "",
    ]


def _notes(comparisons: dict) -> list[str]:
    return [f"- {n}" for n in where_nca_did_not_help(comparisons)] or [
        "- In every cell NCA's Harm verdict is that it lowers Harm."
    ]


def page_text(doc: dict) -> str:
    """`results.md` for the saved document `doc` (`results.json`)."""
    records = doc["records"]
    agg, comparisons = aggregate(records, SAMPLED_METRICS), cell_comparisons(records, FLOOR_PAIRED)
    greedy = greedy_records(records)
    g_comparisons = cell_comparisons(greedy) if greedy else {}
    lines = [*_intro(doc)]
    if greedy:
        lines += _comparison_section(
            "## NCA vs plain OPD, greedy (primary endpoint)", g_comparisons, GREEDY_INTRO, False
        )
    lines += [
        *_comparison_section(
            "## NCA vs plain OPD, sampled", comparisons, SAMPLED_INTRO, floor=True
        ),
        *_headline(records, agg),
        *(_greedy_tables(greedy) if greedy else []),
        *_ablations(agg),
        *_flip(records, agg),
        *_retention(records),
    ]
    if _figure_cells(agg):
        mode = "greedy" if greedy else "sampled"
        lines += ["## Harm by cell", "", f"![{mode} Harm, plain OPD vs NCA]({HARM_FIGURE})", ""]
    lines += ["## Where NCA did not help", ""]
    if greedy:
        lines += ["Greedy (primary endpoint):", "", *_notes(g_comparisons), "", "Sampled:", ""]
    lines += [*_notes(comparisons), ""]
    return "\n".join(lines)


def readme_block(doc: dict, page: str = "docs/results.md") -> str:
    """The README's "Results" block (markers included) for the saved document `doc`; `page` is the
    results page as the README links it."""
    records = doc["records"]
    agg, comparisons = aggregate(records, SAMPLED_METRICS), cell_comparisons(records, FLOOR_PAIRED)
    figure = os.path.join(os.path.dirname(page), HARM_FIGURE)
    lines = [
        README_BEGIN,
        f"`python scripts/reproduce.py`: {len(records)} runs ({_seeds(records)}); every table, "
        f"the machine and library versions, the base models and the ablations: [{page}]({page}).",
        "",
        protocol(records),
        "",
        f"{PRIMARY_ENDPOINT} Every cell of the grid run with both variants ({len(comparisons)} "
        f"cells); mean [{INTERVAL_METHOD}], '-' where undefined.",
        "",
    ]
    greedy = greedy_records(records)
    if greedy:
        g_comparisons = cell_comparisons(greedy)
        lines += [
            "**Greedy** (temperature 0, the primary endpoint): " + _count_line(g_comparisons),
            "",
            _paired_table(g_comparisons),
            "",
        ]
    # The README keeps the primary endpoint's table; the sampled tables live on the page.
    lines += [
        "**Sampled** (independent draws per view; its tables, every metric and Harm's floor: "
        f"[{page}]({page})): " + _count_line(comparisons),
        "",
        PAIRED_NOTE,
        "",
    ]
    if _figure_cells(agg):
        mode = "greedy" if greedy_records(records) else "sampled"
        lines += [f"![{mode} Harm, plain OPD vs NCA]({figure})", ""]
    return "\n".join([*lines, README_END])


def replace_readme_block(readme: str, block: str) -> None:
    """Replaces the text between the README's markers (markers included) by `block`."""
    with open(readme) as f:
        text = f.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no results block (a line {README_BEGIN!r} ... {README_END!r})")
    with open(readme, "w") as f:
        f.write(text[:start] + block + text[end + len(README_END) :])


def read_readme_block(readme: str) -> str | None:
    """The README's results block as it stands (markers included), None without one."""
    with open(readme) as f:
        text = f.read()
    start, end = text.find(README_BEGIN), text.find(README_END)
    return None if start < 0 or end < start else text[start : end + len(README_END)]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _json_stat(s: Stat) -> dict:
    """A `Stat` as JSON: undefined values as null (JSON has no NaN)."""
    return {
        k: None if isinstance(v, float) and math.isnan(v) else v for k, v in s._asdict().items()
    }


def _json_comparison(c: Comparison) -> dict:
    return dict(
        degradation_harm=_json_stat(c.degradation_harm),
        degradation_acc_xc=_json_stat(c.degradation_acc_xc),
        **{
            part: {k: _json_stat(s) for k, s in getattr(c, part).items()} for part in ("opd", "nca")
        },
        diff={k: _json_stat(s) for k, s in c.diff.items()},
        p_holm=None if math.isnan(c.p_holm) else c.p_holm,
        verdict=c.verdict,
    )


def _json_summary(
    records: list[dict], keys: tuple[str, ...], paired_keys: tuple[str, ...] = PAIRED_METRICS
) -> dict:
    """The aggregate per cell and variant over base models and each cell's comparison (plain
    OPD against the base, NCA - OPD, the Holm-corrected verdict), as JSON."""
    return dict(
        aggregate={
            c: {v: {k: _json_stat(s) for k, s in m.items()} for v, m in vs.items()}
            for c, vs in aggregate(records, keys).items()
        },
        paired={
            c: _json_comparison(comp) for c, comp in cell_comparisons(records, paired_keys).items()
        },
    )


# Per-item (and per-draw) lists of an evaluation: they stay in each run's summary.json; the saved
# document keeps every metric and count, without them (132 runs: 6.5 MB of JSON with them).
PER_ITEM_KEYS = (
    "correct_x",
    "correct_xc",
    "correct_x_again",
    "lengths_x",
    "lengths_xc",
    "samples",
)
EVALUATIONS = ("before", "after", "before_greedy", "after_greedy")


def _without_per_item(record: dict) -> dict:
    return {
        k: {f: x for f, x in v.items() if f not in PER_ITEM_KEYS}
        if k in EVALUATIONS and isinstance(v, dict)
        else v
        for k, v in record.items()
    }


def _write_pages(doc: dict, path: str, readme: str | None) -> str:
    records = doc["records"]
    agg = aggregate(records, SAMPLED_METRICS)
    # Every text first: a failure leaves the saved pages as they were.
    text = page_text(doc)
    saved = dict(
        doc,
        records=[_without_per_item(r) for r in records],
        **_json_summary(records, SAMPLED_METRICS, FLOOR_PAIRED),
    )
    greedy = greedy_records(records)
    if greedy:
        saved["greedy"] = _json_summary(greedy, GREEDY_METRICS)
    saved_text = json.dumps(saved, indent=1, default=float)
    page_dir = os.path.dirname(path) or "."
    os.makedirs(page_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        f.write(saved_text)
    # The figure shows the primary endpoint (greedy Harm) where the records have it.
    fig_agg, fig_mode = (
        (aggregate(greedy, GREEDY_METRICS), "greedy") if greedy else (agg, "sampled")
    )
    cells = _figure_cells(fig_agg)
    if cells:
        plot_harm_by_cell(fig_agg, cells, os.path.join(page_dir, HARM_FIGURE), fig_mode)
    if readme:
        page = os.path.relpath(path, os.path.dirname(os.path.abspath(readme)))
        replace_readme_block(readme, readme_block(doc, page))
    return path


def write_results(
    records: list[dict],
    path: str,
    *,
    quick: bool = False,
    seconds: float | None = None,
    environment: dict | None = None,
    readme: str | None = None,
    jobs: int = 1,
) -> str:
    """`path` (markdown; plots next to it in `figures/`), `results.json` beside it (the records,
    every evaluation field kept, the machine, the aggregate), and `readme`'s results block."""
    doc = dict(quick=quick, seconds=seconds, environment=environment, records=records, jobs=jobs)
    return _write_pages(doc, path, readme)


def load_results(json_path: str) -> dict:
    """A saved `results.json` as the document the pages are generated from."""
    with open(json_path) as f:
        saved = json.load(f)
    keys = ("quick", "seconds", "environment", "records", "jobs")
    return {k: saved.get(k) for k in keys}


def rewrite_results(json_path: str, readme: str | None = None) -> str:
    """Regenerates `results.md` (beside `json_path`), its plot and `readme`'s block from the saved
    document, without running anything; returns the page's path."""
    doc = load_results(json_path)
    return _write_pages(doc, os.path.splitext(json_path)[0] + ".md", readme)
