"""Train: on-policy context distillation with No-Context Anchoring.

    python scripts/train.py                                  # the embedded CPU default
    python scripts/train.py --config configs/nudge_cpu.yaml loss.beta=0.0
    python scripts/train.py --config configs/x.yaml --resume # continue from the last checkpoint

With no `student`, a tiny context-following base model for `task.name` is built (or reused from
`base.cache_dir`) first. Overrides are dotted `key=value` pairs checked against the config tree.
An out_dir that holds a run needs --resume or --overwrite. Exit status: 0 done or stopped by
SIGTERM/SIGINT with a checkpoint saved, 1 diverged (NaN/inf), 2 refused input (one line).
"""

import argparse
import sys

from ctxjax.host_memory import exec_with_caching_allocator

if __name__ == "__main__":
    # First of all: the process is replaced, and the imports below (jax and the rest, about a
    # second) would otherwise run in both.
    exec_with_caching_allocator()  # re-executes with mimalloc preloaded on a CPU host

from ctxjax.config import load_config
from ctxjax.logs import configure_logging
from ctxjax.train import Diverged, RunRefused, run


def main(argv: list[str]) -> None:
    configure_logging()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML preset (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--resume-step", type=int, default=None, help="continue from this step")
    parser.add_argument(
        "--unverified",
        action="store_true",
        help="with --resume-step: restore that step even without its checksum manifest",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the run in out_dir")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume with a config that alters the run (recorded in config_history.jsonl)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.0")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"config error: {e.args[0] if e.args else e}\n")
    try:
        run(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
            resume_step=args.resume_step,
            unverified=args.unverified,
            progress=not args.no_progress,
        )
    except RunRefused as e:
        parser.exit(2, f"error: {e}\n")
    except Diverged as e:
        parser.exit(1, f"diverged: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
