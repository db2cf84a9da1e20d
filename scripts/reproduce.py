"""Reproduce the paper's comparison at CPU scale: plain OPD vs OPD + NCA, ablations, beta sweep.

    python scripts/reproduce.py            # every cell, 2 seeds; writes docs/results.md
    python scripts/reproduce.py --quick    # a few-minute smoke run of the same pipeline (CI)

Finished runs (their summary.json) are reused, so an interrupted reproduction picks up where it
stopped.
"""

import argparse
import sys

from ctxjax.reproduce import reproduce


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets, one cell (CI)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per headline cell")
    parser.add_argument("--out", default=None, help="run folder (default runs/reproduce[_quick])")
    parser.add_argument(
        "--results",
        default=None,
        help="markdown written (default docs/results.md; quick: <out>/results.md)",
    )
    args = parser.parse_args(argv)
    out = args.out or ("runs/reproduce_quick" if args.quick else "runs/reproduce")
    results = args.results or (f"{out}/results.md" if args.quick else "docs/results.md")
    print(reproduce(out, results, quick=args.quick, seeds=args.seeds))


if __name__ == "__main__":
    main(sys.argv[1:])
