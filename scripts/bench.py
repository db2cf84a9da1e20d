"""Benchmarks.

    python scripts/bench.py sample [--out bench_sample.json]   # ctxjax generate vs transformers
"""
import argparse
import sys

from ctxjax import benchmarks

# subcommand -> (help, function(out_json) -> dict)
BENCHMARKS = {
    "sample": ("greedy decoding tokens/s, ctxjax vs transformers (torch CPU)",
               benchmarks.bench_sample),
}


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="benchmark", required=True)
  for name, (help_text, _) in BENCHMARKS.items():
    sub.add_parser(name, help=help_text).add_argument(
        "--out", default=None, help="write the results as JSON to this file")
  args = parser.parse_args(argv)
  BENCHMARKS[args.benchmark][1](args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
