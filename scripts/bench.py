"""Benchmarks.

python scripts/bench.py sample [--out bench_sample.json]   # ctxjax generate vs transformers
python scripts/bench.py train [--out bench_train.json] [--preset small|medium] [--reps 5]
                              # train-step time split, FLOPs vs matmul peak, loss memory
python scripts/bench.py train --model PATH [--batch 8] [--new-tokens 32] [--reps 5]
                              # the same split on an HF folder's weights, its memory, peak RSS
python scripts/bench.py step [--configs a,b,c] [--reps 5] [--out-md docs/performance.md]
                              # the step, ctxjax vs the PyTorch way: ratio, parts, peak fraction
python scripts/bench.py gpu [--out bench_gpu.json] [--tiny] [--peak-flops F] [--hbm-bandwidth B]
                            [--profile DIR] [--out-md docs/performance.md]
                            # one accelerator, a 0.5B Qwen2 in bf16: MFU, decode vs HBM, memory
python scripts/bench.py gpu --from-json bench_gpu.json [--ab-json ab.json] --out-md PAGE
                            # the page's accelerator section from a saved run (no device needed)
"""

import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from experiments.bench.cli import main

if __name__ == "__main__":
    main(sys.argv[1:], description=__doc__)
