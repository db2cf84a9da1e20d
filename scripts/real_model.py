"""The paper's phenomenon on a real checkpoint (docs/real_model.md): a base-model screen of the
plan's contexts, then its parts (screen, protocol, start, retention) as ordinary runs.

    python scripts/real_model.py --model models/smollm2-135m-instruct --max-hours 1.9
    python scripts/real_model.py --model FOLDER --part screen          # one part (and the screen)
    python scripts/real_model.py --model FOLDER --plan my_plan.yaml --out runs/mine --doc page.md

Re-running resumes: finished runs are reused, a killed run goes on from its checkpoint. With
--max-hours the command stops cleanly after the run during which the time ran out. Writes
<out>/results.json, the generated section of the page (default docs/real_model.md; with
--plan or --out elsewhere, <out>/real_model.md, a copy, so the page's numbers are replaced only by
the shipped plan's) and the learning curves.
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
from experiments.grid import GridError
from experiments.real_model import DOC, FIGURE, PARTS, PLAN, run_real_model

DEFAULT_OUT = "runs/real_model"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF folder of SmolLM2-135M-Instruct")
    p.add_argument("--plan", default=PLAN, help="the experiment plan (strict YAML)")
    p.add_argument("--out", default=DEFAULT_OUT, help="run folder")
    p.add_argument("--part", choices=PARTS, action="append", help="run only these parts")
    p.add_argument("--max-hours", type=float, default=None, help="stop after the current run")
    args = p.parse_args(argv)
    if args.max_hours is not None and args.max_hours < 0:
        p.error(
            f"--max-hours must be >= 0 (0: run nothing new, only aggregate), got {args.max_hours}"
        )
    shipped = os.path.abspath(args.plan) == PLAN and args.out == DEFAULT_OUT
    doc, figure = DOC, FIGURE
    if not shipped:  # another plan's numbers never replace the page's
        os.makedirs(args.out, exist_ok=True)
        doc = shutil.copy(DOC, os.path.join(args.out, "real_model.md"))
        figure = os.path.join(args.out, "real_model_curves.png")
    try:
        run_real_model(
            args.model, args.out, doc, plan_path=args.plan, parts=tuple(args.part or PARTS),
            max_hours=args.max_hours, figure=figure,
            command=" ".join(["python scripts/real_model.py", *argv]),
        )  # fmt: skip
    except (ValueError, FileNotFoundError, GridError) as e:
        p.exit(2, f"error: {e}\n")
    except Diverged as e:  # the finished runs stay and are reused when the command is re-run
        p.exit(1, f"diverged: {e}\n")
    print(f"results: {os.path.join(args.out, 'results.json')} and {doc}")


if __name__ == "__main__":
    main(sys.argv[1:])
