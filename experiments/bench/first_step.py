"""One first-step measurement (`measure.first_step_here`) in this process, which must be fresh:
`measure.fresh_first_step` starts it as `python -m experiments.bench.first_step SPEC`, SPEC a JSON
object (case, seed, copts, loss, scan_layers). Prints the result as the last line, JSON."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> None:
    from ctxjax.config import LossConfig
    from experiments.bench import measure

    spec = json.loads(argv[0])
    result = measure.first_step_here(
        measure.StepCase(**spec["case"]),
        spec["seed"],
        spec["copts"] or None,
        LossConfig(**spec["loss"]),
        scan_layers=spec["scan_layers"],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
