"""The command line of `scripts/bench.py`: each benchmark's options, then `bench.run`."""

from __future__ import annotations

import argparse
import json

from experiments import bench
from experiments.bench import real, report
from experiments.bench.measure import STEP_CASES, TRAIN_PRESETS


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
    parser.add_argument(
        "--model",
        default=None,
        help="an HF folder: time the step and its parts on its weights (experiments.bench.real)",
    )
    parser.add_argument("--batch", type=int, default=None, help="with --model: rows (8)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="with --model: tokens sampled per row (32)"
    )
    parser.add_argument(
        "--scan-layers", action="store_true", help="with --model: numerics.scan_layers=true"
    )
    parser.add_argument("--remat", action="store_true", help="with --model: numerics.remat=true")


def _step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--configs",
        default="a,b,c",
        help=f"comma-separated step configs, from {sorted(set(STEP_CASES) - {'quick'})}",
    )
    parser.add_argument("--reps", type=int, default=5, help="timed steps per side (median)")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: the cores")
    parser.add_argument("--quick", action="store_true", help="one tiny config (a smoke test)")
    parser.add_argument(
        "--out-md", default=None, help="write the results as markdown (docs/performance.md)"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: print (and with --out-md, write) a result `step --out` saved",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="JSON",
        help="with --out-md: results of earlier runs (`step --out`, other machines) that the page "
        "lists next to this one",
    )


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
    parser.add_argument(
        "--profile",
        dest="profile_dir",
        default=None,
        help="also trace one sampler call and one rest call into this folder; print their top ops",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: print (and with --out-md, write) a result this command saved",
    )
    parser.add_argument(
        "--ab-json",
        default=None,
        help="with --out-md: add the A/Bs `python -m experiments.gpu_ab --out F` saved in F",
    )
    parser.add_argument(
        "--out-md",
        default=None,
        help="replace the accelerator section of this page (docs/performance.md) with the result",
    )


def _real_sizes(args: dict) -> dict:
    """Pops the sizes and numerics only `--model` uses; those given."""
    sizes = {k: args.pop(k) for k in ("batch", "new_tokens", "scan_layers", "remat")}
    return {k: v for k, v in sizes.items() if v not in (None, False)}


# subcommand -> adds its options
OPTIONS = {"sample": None, "train": _train_args, "step": _step_args, "gpu": _gpu_args}


def main(argv: list[str], description: str = __doc__) -> None:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (help_text, _, _) in bench.BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", default=None, help="write the results as JSON to this file")
        if OPTIONS[name]:
            OPTIONS[name](p)
    args = vars(parser.parse_args(argv))
    name, out, out_md = args.pop("benchmark"), args.pop("out"), args.pop("out_md", None)
    if name == "train":
        model, sizes = args.pop("model"), _real_sizes(args)
        if model is not None:  # a real checkpoint: its own measurement
            if args["quick"] or args["preset"] != "small":
                parser.error("--model times the folder's own model: no --preset or --quick")
            result = real.measure_real(model, reps=args["reps"], **sizes)
            real.print_real(result)
            report.write_json(result, out)
            return
        if sizes:
            parser.error(f"{', '.join(sizes)} only apply with --model")
    if name == "gpu":
        _gpu(parser, args, out, out_md, argv)
        return
    compare = args.pop("compare", [])
    if compare and not out_md:
        parser.error("--compare only applies with --out-md")
    # Read before measuring: a bad path should not cost a ten-minute run.
    others = [_load_json(parser, "--compare", path) for path in compare]
    for path, other in zip(compare, others, strict=True):
        if not isinstance(other, dict) or other.get("benchmark") != "step":
            parser.error(f"--compare: {path}: not a saved `step` result")
    result = _measure_or_load(parser, name, args, out)
    if out_md:
        command = " ".join(["python scripts/bench.py", *argv])
        page = report.keep_measured_accelerators(
            report.step_markdown(result, command, others), _read(out_md) or ""
        )
        report.write_text(page, out_md)


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _load_json(parser, flag: str, path: str) -> dict:
    text = _read(path)
    if text is None:
        parser.error(f"{flag}: no such file: {path}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        parser.error(f"{flag}: {path}, line {err.lineno}: not JSON ({err.msg})")


def _measure_or_load(parser, name: str, args: dict, out: str | None) -> dict:
    """Benchmark `name` measured now (printed, saved to `out`), or, with --from-json (`step`,
    `gpu`), the result a run saved, printed and saved again without measuring anything."""
    from_json = args.pop("from_json", None)
    if not from_json:
        return bench.run(name, out, **args)
    result = _load_json(parser, "--from-json", from_json)
    bench.BENCHMARKS[name][2](result)
    report.write_json(result, out)
    return result


def _gpu(parser, args: dict, out: str | None, out_md: str | None, argv: list[str]) -> None:
    """`gpu`: measure (or load a saved result), print, save; with --out-md, the page's section."""
    ab_json = args.pop("ab_json")
    if ab_json and not out_md:
        parser.error("--ab-json only applies with --out-md")
    result = _measure_or_load(parser, "gpu", args, out)
    if out_md:
        ab = _load_json(parser, "--ab-json", ab_json) if ab_json else None
        command = " ".join(["python scripts/bench.py", *argv])
        page = _read(out_md) or "# Performance\n"
        section = report.gpu_markdown(result, ab, command)
        report.write_text(report.with_accelerator_section(page, section), out_md)
