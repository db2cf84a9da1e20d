"""Build (or reuse) the tiny CPU base models for every task and size, and check they read contexts.

python scripts/build_base.py --config configs/base_models.yaml [--out docs/base_models.md]
"""

import argparse
import sys

import yaml

from ctxjax.base import build_all
from ctxjax.report import compare_table


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/base_models.yaml")
    parser.add_argument("--out", default="docs/base_models.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        spec = yaml.safe_load(f)
    rows = build_all(spec, progress=not args.no_progress)
    table = compare_table(
        rows, ["task", "size", "context", "regime", "acc_x", "acc_xc", "delta_len"]
    )
    text = (
        "# Base models\n\nWritten by `python scripts/build_base.py`. Acc_x: no context; "
        "Acc_xc: the context in front (sampled answers, temperature 1).\n\n" + table + "\n"
    )
    with open(args.out, "w") as f:
        f.write(text)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
