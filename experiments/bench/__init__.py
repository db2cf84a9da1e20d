"""Benchmarks (`scripts/bench.py`): `measure` runs them and returns JSON-ready dicts, `report`
prints and writes them. torch and transformers (the reference) are imported only inside `measure`'s
functions that compare against them."""

from __future__ import annotations

from collections.abc import Callable

from experiments.bench import measure, report

# name -> (help, measure(**options) -> dict, print(result))
BENCHMARKS: dict[str, tuple[str, Callable[..., dict], Callable[[dict], None]]] = {
    "sample": (
        "greedy decoding tokens/s, ctxjax vs transformers (torch CPU)",
        measure.measure_sample,
        report.print_sample,
    ),
    "train": (
        "OPD+NCA train step: time per part, FLOPs vs matmul peak, loss memory",
        measure.measure_train,
        report.print_train,
    ),
}


def run(name: str, out_json: str | None = None, **options) -> dict:
    """Measures benchmark `name`, prints it, writes it to `out_json` when given; returns it."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; valid: {sorted(BENCHMARKS)}")
    _, measure_fn, print_fn = BENCHMARKS[name]
    result = measure_fn(**options)
    print_fn(result)
    report.write_json(result, out_json)
    return result
