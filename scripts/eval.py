"""Evaluate: removability metrics of an HF model folder on one context of a task, with a report.

    python scripts/eval.py --model runs/default/final --task synthetic --context careful --out eval/
    python scripts/eval.py --model DISTILLED --baseline BASE --task synthetic --context add3 \\
        --task-option min_len=3 --examples 256 --out eval/
    python scripts/eval.py --model MODEL --data eval.jsonl --task-option "verifier=number" --out ev/

`--data FILE.jsonl` evaluates a user's records (task "jsonl", task options of
ctxjax.tasks.jsonl.JsonlTask: `verifier`, `context`, ...). Writes eval.json, eval.md and PNG plots
into --out and prints the metric table. Bad input exits with status 2.
"""

import argparse
import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from ctxjax.evaluate import InputError, parse_task_options
from ctxjax.hf import HFFolderError
from ctxjax.tasks.verifiers import VerifierError
from experiments.eval_report import evaluate_and_report, metrics_table


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--model", required=True, help="HF model folder (config.json + safetensors)")
    add("--task", default=None, help="task name (ctxjax.tasks.TASKS); required without --data")
    add("--data", default=None, help="a JSONL eval file: the records' own task ('jsonl')")
    add("--context", default="", help="context name (with --data: default the file's only one)")
    add("--task-option", action="append", default=[], metavar="KEY=VALUE",
        help="task option (a dataclass field of the task), YAML value; repeatable")  # fmt: skip
    add("--examples", type=int, default=128, help="records per context")
    add("--temperature", type=float, default=0.0, help="0 = greedy")
    add("--samples", type=int, default=None, help="draws per item and view (sampled; default 4)")
    add("--coupled-views", action="store_true", help="share sampling noise (biases Harm to 0)")
    add("--placement", default="system", help="context in the system or the user message")
    add("--max-new-tokens", type=int, default=16)
    add("--batch-size", type=int, default=64)
    add("--seed", type=int, default=1234)
    add("--no-retention", action="store_true", help="skip the other contexts")
    add("--no-cosine", action="store_true", help="skip the per-layer cosine")
    add("--baseline", default=None, help="another model folder to compare against")
    add("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    add("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    add("--title", default="", help="report title")
    add("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if (args.task is None) == (args.data is None) and args.task != "jsonl":
        p.exit(2, "error: give --task NAME (and --context) or --data FILE.jsonl\n")
    try:
        options = parse_task_options(args.task_option)
        if args.data:
            options["eval_file"] = args.data
        out = evaluate_and_report(
            args.model, "jsonl" if args.data else args.task, args.context,
            task_options=options, out_dir=args.out, baseline_path=args.baseline,
            tokenizer_path=args.tokenizer, param_dtype=args.dtype, title=args.title,
            examples=args.examples, temperature=args.temperature, samples=args.samples,
            coupled_views=args.coupled_views, placement=args.placement,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, retention=not args.no_retention,
            with_cosine=not args.no_cosine,
        )  # fmt: skip
    # HFFolderError: a corrupt or half-written folder; VerifierError: the user's verifier failed.
    except (InputError, HFFolderError, VerifierError) as e:
        p.exit(2, f"error: {e}\n")
    print(metrics_table(out, out.get("baseline")))
    print(f"\nreport written to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
