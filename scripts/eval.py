"""Evaluate: removability metrics of an HF model folder on one context of a task, with a report.

    python scripts/eval.py --model runs/default/final --task synthetic --context careful --out eval/
    python scripts/eval.py --model DISTILLED --baseline BASE --task synthetic --context add3 \\
        --task-option min_len=3 --examples 256 --out eval/

Writes eval.json, eval.md and PNG plots into --out and prints the metric table. The tokenizer is
read from the model's folder unless --tokenizer is given. Bad input exits with status 2.
"""

import argparse
import sys

from ctxjax.hf import HFFolderError
from ctxjax.report import InputError, evaluate_checkpoint, metrics_table, parse_task_options


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="HF model folder (config.json + safetensors)")
    p.add_argument("--task", default="synthetic", help="task name (ctxjax.tasks.TASKS)")
    p.add_argument("--context", default="careful", help="context name of the task")
    p.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (a dataclass field of the task), YAML value; repeatable",
    )
    p.add_argument("--examples", type=int, default=128, help="records per context")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-retention", action="store_true", help="skip the other contexts")
    p.add_argument("--no-cosine", action="store_true", help="skip the per-layer cosine")
    p.add_argument("--baseline", default=None, help="another model folder to compare against")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="param dtype the weights are cast to",
    )
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        out = evaluate_checkpoint(
            args.model,
            args.task,
            args.context,
            task_options=parse_task_options(args.task_option),
            out_dir=args.out,
            baseline_path=args.baseline,
            tokenizer_path=args.tokenizer,
            param_dtype=args.dtype,
            title=args.title,
            examples=args.examples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            retention=not args.no_retention,
            with_cosine=not args.no_cosine,
        )
    except (InputError, HFFolderError) as e:  # HFFolderError: a corrupt or half-written folder
        p.exit(2, f"error: {e}\n")
    print(metrics_table(out, out.get("baseline")))
    print(f"\nreport written to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
