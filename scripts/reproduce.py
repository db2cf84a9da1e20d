"""Reproduce the paper's comparison at CPU scale: plain OPD vs OPD + NCA, ablations, beta sweep.

    python scripts/reproduce.py            # configs/grids/reproduce.yaml; writes docs/results.md
    python scripts/reproduce.py --quick    # configs/grids/quick.yaml: a few-minute smoke run (CI)

Finished runs (their summary.json) are reused, so an interrupted reproduction picks up where it
stopped.
"""

import argparse
import sys

from experiments.reproduce import reproduce


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the quick grid (CI)")
    parser.add_argument("--grid", default=None, help="another grid file (default: by --quick)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per headline cell")
    parser.add_argument("--out", default=None, help="run folder (default runs/reproduce[_quick])")
    parser.add_argument(
        "--results",
        default=None,
        help="markdown written (default docs/results.md; quick: <out>/results.md)",
    )
    args = parser.parse_args(argv)
    out = args.out or ("runs/reproduce_quick" if args.quick else "runs/reproduce")
    results = args.results or (f"{out}/results.md" if args.quick else "docs/results.md")
    path = reproduce(out, results, quick=args.quick, grid_path=args.grid, seeds=args.seeds)
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
