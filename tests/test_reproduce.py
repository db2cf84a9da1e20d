"""The reproduction's plan, its aggregation, and `scripts/reproduce.py --quick` end to end."""

import os
import subprocess
import sys

import pytest

from ctxjax import reproduce
from ctxjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_covers_the_issue():
    specs = reproduce.plan()
    cells = {s.cell for s in specs}
    assert len(cells) >= 12
    for cell in cells:
        variants = {(s.variant, s.seed) for s in specs if s.cell == cell}
        assert {("opd", 0), ("opd", 1), ("nca", 0), ("nca", 1)} <= variants
    for task, context, size in reproduce.ABLATION_CELLS:
        cell = f"{task}/{context}/{size}"
        assert {"dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0"} <= {
            s.variant for s in specs if s.cell == cell
        }
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    # Run folders are keyed by the overrides too: other settings never reuse a finished run.
    changed = reproduce.RunSpec(**{**specs[0].__dict__, "overrides": specs[0].overrides + ("x=1",)})
    assert changed.name == specs[0].name and changed.run_dir_name != specs[0].run_dir_name
    for spec in specs:  # every run's overrides are a valid config
        load_config(None, list(spec.overrides))


def _record(cell, variant, seed, **after):
    return dict(
        cell=cell,
        spec=dict(variant=variant, seed=seed),
        before=dict(acc_x=0.5, acc_xc=0.9, harm=0.0),
        after=after,
    )


def test_aggregate_and_where_nca_did_not_help():
    recs = [
        _record("a", "opd", 0, acc_x=0.9, harm=0.30),
        _record("a", "opd", 1, acc_x=0.9, harm=0.10),
        _record("a", "nca", 0, acc_x=0.9, harm=0.0),
        _record("a", "nca", 1, acc_x=0.9, harm=0.02),
        _record("b", "opd", 0, acc_x=0.9, harm=0.1),
        _record("b", "nca", 0, acc_x=0.5, harm=0.1),
    ]
    agg = reproduce.aggregate(recs)
    mean, std, n = agg["a"]["opd"]["harm"]
    assert (mean, n) == (pytest.approx(0.2), 2) and std == pytest.approx(0.1)
    assert agg["a"]["base"]["acc_xc"][0] == pytest.approx(0.9)
    notes = reproduce.where_nca_did_not_help(agg)
    assert len(notes) == 2 and all(n.startswith("b:") for n in notes)
    # A cell where NCA erased the with-context behaviour is named as such.
    erased = reproduce.aggregate(
        [
            _record("c", "opd", 0, acc_x=0.0, acc_xc=0.8, harm=0.0),
            _record("c", "nca", 0, acc_x=0.0, acc_xc=0.0, harm=0.0),
        ]
    )
    [note] = [n for n in reproduce.where_nca_did_not_help(erased) if "Acc_xc" in n]
    assert note.startswith("c: Acc_xc 0.000 with NCA vs 0.800")


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path):
    out = tmp_path / "rep"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "reproduce.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert "| cell | model | acc_x |" in text and "## Where NCA did not help" in text
    assert (out / "figures" / "harm_opd_vs_nca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("opd", "nca"):
        [run] = out.glob(f"synthetic-careful-small-{variant}-s0-*")
        assert (run / "summary.json").exists()


def test_base_models_yaml_builds_the_bases_reproduce_distills():
    """configs/base_models.yaml is valid (tasks construct, budgets are BaseModelConfig fields) and its
    synthetic and frozenlake entries are exactly the base models reproduce.py's cells start from."""
    import dataclasses

    import yaml

    from ctxjax.base import MODEL_SIZES, base_key
    from ctxjax.config import BaseModelConfig
    from ctxjax.model import ModelConfig
    from ctxjax.tasks import get_task

    with open(os.path.join(ROOT, "configs", "base_models.yaml")) as f:
        spec = yaml.safe_load(f)
    keys = set()
    for task_name, task_spec in spec["tasks"].items():
        get_task(task_name, **(task_spec.get("options") or {}))
        base_cfg = dataclasses.replace(
            BaseModelConfig(),
            cache_dir=spec["cache_dir"],
            **{k: v for k, v in task_spec.items() if k != "options"},
        )
        for size in spec["sizes"]:
            model_cfg = dataclasses.replace(
                ModelConfig(vocab_size=base_cfg.vocab_size), **MODEL_SIZES[size]
            )
            keys.add(
                base_key(
                    task_name,
                    dict(task_spec.get("options") or {}),
                    model_cfg,
                    base_cfg,
                    base_cfg.seed,
                )
            )
    for s in reproduce.plan():
        if (
            "base.sft_steps=600" in s.overrides
        ):  # the weaker-base comparison cells (train.py default)
            continue
        cfg = load_config(None, list(s.overrides))
        assert (
            base_key(cfg.task.name, dict(cfg.task.options), cfg.model, cfg.base, cfg.base.seed)
            in keys
        ), s.name


def test_write_results_groups_cells_by_regime(tmp_path):
    assert reproduce.cell_regime("synthetic600/hint/small") == "nudge"
    recs = [
        _record(cell, v, s, acc_x=0.9, acc_xc=0.8, harm=h)
        for cell in ("synthetic/rev/small", "synthetic/careful/small")
        for v, h in (("opd", 0.2), ("nca", 0.0))
        for s in (0, 1)
    ]
    text = open(reproduce.write_results(recs, str(tmp_path / "results.md"))).read()
    nudge, flip = text.index("### nudge"), text.index("### flip")
    assert nudge < text.index("synthetic/careful/small") < flip < text.index("synthetic/rev/small")
    assert "In every cell NCA lowered Harm" in text
