"""Reproduce the paper's comparison at CPU scale: plain OPD vs OPD + NCA, ablations, beta sweep.

    python scripts/reproduce.py            # configs/grids/reproduce.yaml; docs/results.md, README
    python scripts/reproduce.py --quick    # configs/grids/quick.yaml: a few-minute smoke run (CI)
    python scripts/reproduce.py --rewrite  # the pages again from docs/results.json, nothing run

Finished runs (their summary.json) are reused, so an interrupted reproduction picks up where it
stopped.
"""

import argparse
import os
import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from ctxjax.train import Diverged, RunRefused
from experiments.grid import GridError
from experiments.reproduce import reproduce
from experiments.results_page import rewrite_results
from experiments.runner import COMPILATION_CACHE, use_compilation_cache


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the quick grid (CI)")
    parser.add_argument("--grid", default=None, help="another grid file (default: by --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="distillation seeds per cell")
    parser.add_argument("--base-seeds", type=int, default=None, help="base-model seeds per cell")
    parser.add_argument("--out", default=None, help="run folder (default runs/reproduce[_quick])")
    parser.add_argument(
        "--results",
        default=None,
        help="markdown written (default docs/results.md; quick: <out>/results.md)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each in its own process (default 1)"
    )
    parser.add_argument("--rewrite", action="store_true", help="pages from results.json only")
    args = parser.parse_args(argv)
    out = args.out or ("runs/reproduce_quick" if args.quick else "runs/reproduce")
    results = args.results or (f"{out}/results.md" if args.quick else "docs/results.md")
    # Only the full grid's default page feeds the README's results block.
    readme = "README.md" if results == "docs/results.md" else None
    if args.rewrite:
        print(rewrite_results(results.removesuffix(".md") + ".json", readme))
        return
    if args.jobs <= 1:  # the runs compile in this process (--jobs N: in workers that set it)
        use_compilation_cache(os.path.join(out, COMPILATION_CACHE))
    kw = dict(
        grid_path=args.grid,
        seeds=args.seeds,
        base_seeds=args.base_seeds,
        readme=readme,
        jobs=args.jobs,
    )
    try:
        print(reproduce(out, results, quick=args.quick, **kw))
    except (GridError, RunRefused) as e:
        parser.exit(2, f"error: {e}\n")
    except Diverged as e:  # the finished runs stay and are reused when the command is re-run
        parser.exit(1, f"diverged: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
