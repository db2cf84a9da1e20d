"""Aggregation of finished runs: per cell and variant, each metric's mean and spread over seeds; and
the plain list of cells where NCA did not help."""

from __future__ import annotations

import math

import numpy as np

from ctxjax.metrics import SUMMARY_KEYS
from experiments.tables import Stat

# The metrics of a run's evaluation that the result tables show (a record keeps every field).
METRICS = SUMMARY_KEYS  # the metrics every table reports (ctxjax.metrics)


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Over the defined values (None and NaN left out: an empty ratio is not a 0)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values))


def aggregate(records: list[dict]) -> dict:
    """cell -> variant -> metric -> `Stat` over seeds (its n counts the runs); the model before
    distillation as 'base' (from the plain-OPD runs, one per seed)."""
    table: dict = {}
    for rec in records:
        cell, variant = rec["cell"], rec["spec"]["variant"]
        table.setdefault(cell, {}).setdefault(variant, []).append(rec["after"] or {})
        if variant == "opd":
            table[cell].setdefault("base", []).append(rec["before"] or {})
    return {
        cell: {
            variant: {k: Stat(*_mean_std([r.get(k) for r in rows]), len(rows)) for k in METRICS}
            for variant, rows in variants.items()
        }
        for cell, variants in table.items()
    }


def where_nca_did_not_help(agg: dict, tol: float = 0.02) -> list[str]:
    """Cells where NCA's Harm was not lower than OPD's, or NCA cost accuracy; what was measured,
    nothing more. A cell whose Harm is undefined for either variant (no item right without the
    context) is left out of the Harm comparison."""
    notes = []
    for cell, variants in sorted(agg.items()):
        if "opd" not in variants or "nca" not in variants:
            continue
        opd, nca = variants["opd"], variants["nca"]
        harms = (nca["harm"].mean, opd["harm"].mean)
        if not any(math.isnan(h) for h in harms) and not harms[0] < harms[1] - tol:
            notes.append(
                f"{cell}: Harm {harms[0]:.3f} with NCA vs {harms[1]:.3f} with plain OPD "
                f"(no reduction larger than {tol})"
            )
        if nca["acc_x"].mean < opd["acc_x"].mean - 0.05:
            notes.append(
                f"{cell}: Acc_x {nca['acc_x'].mean:.3f} with NCA vs {opd['acc_x'].mean:.3f} "
                f"with plain OPD"
            )
        if nca["acc_xc"].mean < opd["acc_xc"].mean - 0.1:
            notes.append(
                f"{cell}: Acc_xc {nca['acc_xc'].mean:.3f} with NCA vs {opd['acc_xc'].mean:.3f} "
                f"with plain OPD"
            )
    return notes
