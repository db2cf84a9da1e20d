"""Build (or reuse) the tiny CPU base models for every task and size, and check they read contexts.

python scripts/build_base.py --config configs/base_models.yaml [--out docs/base_models.md]
"""

import argparse
import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from experiments.base_models import build_and_write


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/base_models.yaml")
    parser.add_argument("--out", default="docs/base_models.md")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    print(build_and_write(args.config, args.out, progress=not args.no_progress))


if __name__ == "__main__":
    main(sys.argv[1:])
