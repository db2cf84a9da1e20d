"""The base models of `configs/base_models.yaml`: build (or reuse) one per task entry and size,
check that each reads its contexts (Acc_x vs Acc_xc on every context of its task), and write the
page (`docs/base_models.md`)."""

from __future__ import annotations

import os

from experiments.grid import BaseModelsSpec, load_base_models
from experiments.tables import compare_table

COLUMNS = ["task", "size", "context", "regime", "acc_x", "acc_xc", "delta_len"]


def build_all(spec: BaseModelsSpec, *, progress: bool = True) -> list[dict]:
    """One row per base model and context: Acc_x, Acc_xc, Δlen and the model's folder."""
    from ctxjax import hf
    from ctxjax.base import build_or_reuse_base
    from ctxjax.evaluate import evaluate_context
    from ctxjax.tasks import get_task

    rows = []
    for name, entry in spec.entries.items():
        base_cfg = entry.base_config(spec.cache_dir)
        task = get_task(entry.task, **entry.options)
        for size in spec.sizes:
            model_cfg = spec.model_config(size, base_cfg.vocab_size)
            path = build_or_reuse_base(
                entry.task, dict(entry.options), model_cfg, base_cfg, progress=progress
            )
            model, tokenizer = hf.load_model(path), hf.load_tokenizer(path)
            for context in task.contexts():
                res = evaluate_context(
                    model,
                    tokenizer,
                    task,
                    context,
                    examples=spec.eval.examples,
                    max_new_tokens=spec.eval.max_new_tokens,
                    temperature=spec.eval.temperature,
                    retention=False,
                    with_cosine=False,
                )
                rows.append(
                    dict(
                        task=name,
                        size=size,
                        context=context,
                        regime=task.regime(context),
                        acc_x=res["acc_x"],
                        acc_xc=res["acc_xc"],
                        delta_len=res["delta_len"],
                        path=path,
                    )
                )
    return rows


def write_page(rows: list[dict], path: str) -> str:
    """The base-model table as markdown at `path`; returns the table."""
    table = compare_table(rows, COLUMNS)
    text = (
        "# Base models\n\nWritten by `python scripts/build_base.py`. Acc_x: no context; "
        "Acc_xc: the context in front (sampled answers, temperature 1).\n\n" + table + "\n"
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return table


def build_and_write(config: str, out: str, *, progress: bool = True) -> str:
    """`scripts/build_base.py`: the strict spec at `config`, every base model, the page at `out`."""
    return write_page(build_all(load_base_models(config), progress=progress), out)
