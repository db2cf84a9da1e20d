"""The reproduction harness: the strict grid and base-model loaders, the plan, reusing finished
runs, the aggregation, the results page, and `scripts/reproduce.py --quick` end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from ctxjax.config import RunConfig, from_dict, load_config
from experiments import grid as grid_lib
from experiments.reproduce import GRIDS
from experiments.results_page import cell_regime, write_results
from experiments.runner import run_all
from experiments.stats import aggregate, where_nca_did_not_help

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_MODELS = os.path.join(ROOT, "configs", "base_models.yaml")


def test_plan_covers_the_issue():
    grid = grid_lib.load_grid(GRIDS["full"])
    specs = grid_lib.plan(grid)
    cells = {s.cell for s in specs}
    assert len(cells) >= 12
    for cell in cells:
        variants = {(s.variant, s.seed) for s in specs if s.cell == cell}
        assert {("opd", 0), ("opd", 1), ("nca", 0), ("nca", 1)} <= variants
    for c in grid.ablation_cells:
        assert {"dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0"} <= {
            s.variant for s in specs if s.cell == f"{c.task}/{c.context}/{c.size}"
        }
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    # Run folders are keyed by the overrides too: other settings never reuse a finished run.
    changed = dataclasses.replace(specs[0], overrides=(*specs[0].overrides, "x=1"))
    assert changed.name == specs[0].name and changed.run_dir_name != specs[0].run_dir_name


def test_a_cell_starts_from_its_base_model_entry():
    """A grid task names a base_models.yaml entry: its runs get that entry's task, options and SFT
    budget (one definition), and the task's own overrides come after it."""
    grid = grid_lib.load_grid(GRIDS["full"])
    entries = grid_lib.load_base_models(BASE_MODELS).entries
    by_name = {s.name: s for s in grid_lib.plan(grid)}
    for name, entry, sft_steps in (
        ("mcq-system-small-nca-s1", entries["mcq"], 1500),
        ("synthetic600-hint-medium-opd-s0", entries["synthetic"], 600),
    ):
        cfg = load_config(None, list(by_name[name].overrides))
        assert (cfg.task.name, cfg.task.options) == (entry.task, entry.options)
        assert cfg.base.sft_steps == sft_steps and cfg.train.seed == int(name[-1])
        assert cfg.model.num_layers == grid.base_models.sizes[name.split("-")[2]]["num_layers"]


def test_quick_grid_extends_the_full_one():
    quick, full = grid_lib.load_grid(GRIDS["quick"]), grid_lib.load_grid(GRIDS["full"])
    assert quick.variants == full.variants and quick.tasks == full.tasks
    specs = grid_lib.plan(quick)
    assert [s.name for s in specs] == [
        "synthetic-careful-small-opd-s0",
        "synthetic-careful-small-nca-s0",
    ]
    cfg = load_config(None, list(specs[1].overrides))
    assert (cfg.train.steps, cfg.eval.examples, cfg.data.batch_size) == (6, 8, 8)
    assert (cfg.loss.beta, cfg.loss.consistency) == (0.5, "nca")


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "task": {"options": {"families": ["seq"], "max_len": 4}},
            "optim": {"learning_rate": 3e-4},
        },
        {"task": {"name": "synthetic", "context": "yes"}, "student": "a: b", "loss": {"beta": 0}},
    ],
)
def test_dotted_overrides_load_back_as_the_mapping(overrides):
    # Independent reference: the mapping read by `from_dict` directly. Leaves that YAML would read
    # as something else ("yes" -> True, "a: b" -> a mapping) must still come back as strings.
    assert load_config(None, grid_lib.dotted(overrides)) == from_dict(RunConfig, overrides)


def _write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path)


def _grid_copy(tmp_path, edit) -> str:
    """The full grid and base_models.yaml copied into tmp_path, the grid changed by `edit`."""
    with open(GRIDS["full"]) as f:
        values = yaml.safe_load(f)
    with open(BASE_MODELS) as f:
        _write_yaml(tmp_path / "base_models.yaml", yaml.safe_load(f))
    values["base_models"] = "base_models.yaml"
    edit(values)
    return _write_yaml(tmp_path / "grid.yaml", values)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda g: g["variants"]["nca"]["loss"].update(bta=0.5),
            r"grid\.yaml: variants\.nca: unknown config key 'loss\.bta'",
        ),
        (
            lambda g: g["tasks"]["frozenlake"]["overrides"]["rollout"].update(max_new_token=24),
            r"grid\.yaml: tasks\.frozenlake\.overrides: unknown config key "
            r"'rollout\.max_new_token'",
        ),
        (
            lambda g: g["cells"][2].update(contxt="rev"),
            r"grid\.yaml: cells\[2\]: unknown config key 'contxt'",
        ),
        (
            lambda g: g["tasks"]["synthetic600"].update(base_model="synthetic600"),
            r"grid\.yaml: tasks\.synthetic600: unknown base_model 'synthetic600'",
        ),
        (lambda g: g.update(seed=[0]), r"grid\.yaml: top level: unknown config key 'seed'"),
        (lambda g: g["common"].update(train={"stepz": 3}), r"common: unknown config key"),
    ],
)
def test_mistyped_grid_key_is_an_error_naming_file_and_cell(tmp_path, edit, message):
    path = _grid_copy(tmp_path, edit)
    with pytest.raises(grid_lib.GridError, match=message):
        grid_lib.load_grid(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda b: b["tasks"]["mcq"].update(sft_step=1500),
            r"base_models\.yaml: tasks\.mcq: unknown config key 'base\.sft_step'",
        ),
        (  # the sizes are the library's (ctxjax.config.MODEL_SIZES), not the file's
            lambda b: b.update(sizes={"small": {"hidden_size": 48}}),
            r"base_models\.yaml: top level: unknown config key 'sizes'",
        ),
        (
            lambda b: b["eval"].update(exampels=64),
            r"base_models\.yaml: eval: unknown config key 'exampels'",
        ),
        (lambda b: b.update(cache=1), r"base_models\.yaml: top level: unknown config key 'cache'"),
    ],
)
def test_mistyped_base_models_key_is_an_error_naming_it(tmp_path, edit, message):
    with open(BASE_MODELS) as f:
        values = yaml.safe_load(f)
    edit(values)
    with pytest.raises(grid_lib.GridError, match=message):
        grid_lib.load_base_models(_write_yaml(tmp_path / "base_models.yaml", values))


def test_run_all_reuses_a_finished_run_and_keeps_every_evaluation_field(tmp_path):
    [spec] = grid_lib.plan(grid_lib.load_grid(GRIDS["quick"]))[:1]
    run_dir = tmp_path / spec.run_dir_name
    run_dir.mkdir()
    after = {"acc_x": 0.5, "n": 8, "n_right_x": 4, "help": None, "retention": {"hint": 0.25}}
    summary = {"before": {"acc_x": 0.25, "n": 8}, "after": after}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "timing.json").write_text(json.dumps({"seconds": 12.5}))
    [rec] = run_all([spec], str(tmp_path), base_cache=str(tmp_path / "base"))
    assert not rec["ran"] and rec["seconds"] == 12.5  # reused, not trained again
    assert rec["after"] == after and rec["before"] == summary["before"]
    assert rec["cell"] == "synthetic/careful/small" and rec["spec"]["task_name"] == "synthetic"


def _record(cell, variant, seed, **after):
    return dict(
        cell=cell,
        spec=dict(variant=variant, seed=seed, task_name=cell.split("/")[0].rstrip("0123456789")),
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
    agg = aggregate(recs)
    mean, std, n = agg["a"]["opd"]["harm"]
    assert (mean, n) == (pytest.approx(0.2), 2) and std == pytest.approx(0.1)
    assert agg["a"]["base"]["acc_xc"][0] == pytest.approx(0.9)
    notes = where_nca_did_not_help(agg)
    assert len(notes) == 2 and all(n.startswith("b:") for n in notes)
    # A cell where NCA erased the with-context behaviour is named with what was measured, and its
    # undefined Harm (no item right without the context) is not compared as if it were 0.
    erased = aggregate(
        [
            _record("c", "opd", 0, acc_x=0.0, acc_xc=0.8, harm=None),
            _record("c", "nca", 0, acc_x=0.0, acc_xc=0.0, harm=None),
        ]
    )
    [note] = where_nca_did_not_help(erased)
    assert note == "c: Acc_xc 0.000 with NCA vs 0.800 with plain OPD"


def test_write_results_groups_cells_by_regime(tmp_path):
    assert cell_regime("synthetic", "hint") == "nudge"
    recs = [
        _record(cell, v, s, acc_x=0.9, acc_xc=0.8, harm=h, n=96)
        for cell in ("synthetic/rev/small", "synthetic600/careful/small")
        for v, h in (("opd", 0.2), ("nca", 0.0))
        for s in (0, 1)
    ]
    with open(write_results(recs, str(tmp_path / "results.md"))) as f:
        text = f.read()
    nudge, flip = text.index("### nudge"), text.index("### flip")
    assert (
        nudge < text.index("synthetic600/careful/small") < flip < text.index("synthetic/rev/small")
    )
    assert "| synthetic/rev/small | opd | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.200 ± 0.000 |" in text
    assert "In every cell NCA lowered Harm" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["records"][0]["after"]["n"] == 96  # every evaluation field is kept
    assert (tmp_path / "figures" / "harm_opd_vs_nca.png").read_bytes()[:4] == b"\x89PNG"


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
