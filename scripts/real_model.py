"""The real-model example: SmolLM2-135M-Instruct internalizes a format system prompt, plain OPD vs
OPD + NCA (beta 0.5) over seeds 0 and 1, evaluated before and after (docs/real_model.md).

    python scripts/real_model.py --model /path/to/smollm2-folder [--out runs/real_model]
    python scripts/real_model.py --model FOLDER --smoke     # 2 steps, 4 items: proves the pipeline

Writes <out>/results.json and the results section of docs/real_model.md (--smoke: of
<out>/real_model.md, a copy, so smoke numbers never replace the page's). Finished runs are reused:
re-running resumes. Extra dotted overrides of configs/smollm2_cpu.yaml go last (train.steps=30).
"""

import argparse
import os
import shutil
import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from ctxjax.train import Diverged
from experiments.real_model import DOC, SEEDS, SMOKE_OVERRIDES, run_real_model


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF folder of SmolLM2-135M-Instruct (or similar)")
    p.add_argument("--out", default=None, help="run folder (default runs/real_model[_smoke])")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="distillation seeds 0..n-1")
    p.add_argument("--smoke", action="store_true", help="tiny budgets, results beside the runs")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the preset")
    args = p.parse_args(argv)
    out = args.out or ("runs/real_model_smoke" if args.smoke else "runs/real_model")
    doc = DOC
    if args.smoke:
        os.makedirs(out, exist_ok=True)
        doc = shutil.copy(doc, os.path.join(out, "real_model.md"))
    overrides = (*(SMOKE_OVERRIDES if args.smoke else ()), *args.overrides)
    try:
        run_real_model(
            args.model, out, doc, seeds=tuple(range(args.seeds)), overrides=overrides,
            command=" ".join(["python scripts/real_model.py", *argv]),
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"error: {e}\n")
    except Diverged as e:  # the finished runs stay and are reused when the command is re-run
        p.exit(1, f"diverged: {e}\n")
    print(f"results: {os.path.join(out, 'results.json')} and {doc}")


if __name__ == "__main__":
    main(sys.argv[1:])
