"""The paper's comparison at CPU scale: plain OPD vs OPD + NCA, ablations and a beta sweep.

The grid is data (`configs/grids/reproduce.yaml`, `quick.yaml`); every run is an ordinary
`ctxjax.train.run` whose `summary.json` is the record; finished runs are reused, so an interrupted
reproduction resumes. `results.md` holds tables and plots, and a plain list of the cells where NCA
did not help; the README's "Results" block is generated from the same `results.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ctxjax.logs import configure_logging
from experiments.environment import machine
from experiments.grid import load_grid, plan
from experiments.results_page import write_results
from experiments.runner import run_all

log = logging.getLogger(__name__)
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
GRIDS = {
    "full": os.path.join(_CONFIGS, "grids", "reproduce.yaml"),
    "quick": os.path.join(_CONFIGS, "grids", "quick.yaml"),
}


def reproduce(
    out_dir: str = "runs/reproduce",
    results_path: str = "docs/results.md",
    *,
    quick: bool = False,
    grid_path: str | None = None,
    seeds: int | None = None,
    base_seeds: int | None = None,
    readme: str | None = None,
    jobs: int = 1,
) -> str:
    """Plans the grid (`GRIDS`; `seeds` / `base_seeds` replace its headline distillation / base
    seeds by 0..n-1), runs (or reuses) every run under `out_dir`, `jobs` at a time, and evaluates
    each greedily as well; writes `results_path` and `readme`'s results block."""
    configure_logging("ctxjax", "experiments")
    t0 = time.time()
    grid = load_grid(grid_path or GRIDS["quick" if quick else "full"])
    if seeds is not None:
        grid = dataclasses.replace(grid, seeds=tuple(range(seeds)))
    if base_seeds is not None:
        grid = dataclasses.replace(grid, base_seeds=tuple(range(base_seeds)))
    specs = plan(grid)
    log.info("%d runs planned", len(specs))
    # The full run shares base models with `scripts/train.py` and `scripts/build_base.py`
    # (base_models.yaml's cache); the quick one keeps its throw-away tiny ones beside its runs.
    base_cache = os.path.join(out_dir, "base") if quick else grid.base_models.cache_dir
    records = run_all(specs, out_dir, base_cache=base_cache, jobs=jobs, greedy=True)
    # An invocation that only rewrites the page from finished runs has no time worth reporting.
    seconds = time.time() - t0 if any(r["ran"] for r in records) else None
    return write_results(
        records,
        results_path,
        quick=quick,
        seconds=seconds,
        environment=machine(),
        readme=readme,
        jobs=jobs,
    )
