"""Benchmarks.

python scripts/bench.py sample [--out bench_sample.json]   # ctxjax generate vs transformers
python scripts/bench.py train [--out bench_train.json] [--preset small|medium] [--reps 5]
                              # train-step time split, FLOPs vs matmul peak, loss memory
python scripts/bench.py gpu [--out bench_gpu.json] [--tiny] [--peak-flops F] [--hbm-bandwidth B]
                            # one accelerator, a 0.5B Qwen2 in bf16: MFU, decode vs HBM, memory
"""

import argparse
import sys

from experiments import bench
from experiments.bench.measure import TRAIN_PRESETS


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="small",
        choices=sorted(TRAIN_PRESETS),
        help="model and batch sizes of the timing part (small = the CPU default run)",
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed calls per part (median reported)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke test)")


def _gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (the CPU test)")
    parser.add_argument(
        "--peak-flops", type=float, default=None, help="device peak bf16 FLOP/s (default: table)"
    )
    parser.add_argument(
        "--hbm-bandwidth", type=float, default=None, help="device HBM bytes/s (default: table)"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed calls per part (median)")
    parser.add_argument("--batch", type=int, default=None, help="rollout batch (default 16)")
    parser.add_argument(
        "--param-dtype", default="float32", choices=("float32", "bfloat16"), help="stored params"
    )


# subcommand -> adds its options
OPTIONS = {"sample": None, "train": _train_args, "gpu": _gpu_args}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, _, _) in bench.BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", default=None, help="write the results as JSON to this file")
        if OPTIONS[name]:
            OPTIONS[name](p)
    args = vars(parser.parse_args(argv))
    name, out = args.pop("benchmark"), args.pop("out")
    bench.run(name, out, **args)


if __name__ == "__main__":
    main(sys.argv[1:])
