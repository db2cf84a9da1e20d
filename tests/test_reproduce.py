"""The reproduction harness: the strict grid and base-model loaders, the plan, reusing finished
runs, the aggregation, the results page, and `scripts/reproduce.py --quick` end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from ctxjax.config import RunConfig, from_dict, load_config
from experiments import grid as grid_lib
from experiments.reproduce import GRIDS
from experiments.results_page import (
    README_BEGIN,
    README_END,
    cell_regime,
    load_results,
    page_text,
    protocol,
    read_readme_block,
    readme_block,
    rewrite_results,
    write_results,
)
from experiments.runner import run_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_MODELS = os.path.join(ROOT, "configs", "base_models.yaml")


def test_plan_covers_the_issue():
    grid = grid_lib.load_grid(GRIDS["full"])
    specs = grid_lib.plan(grid)
    cells = {s.cell for s in specs}
    # The paper's settings: planning games, system-prompt QA, free-length
    # answers, a cross-size teacher, the flip regime; nudges on the 600-step bases.
    assert {
        "synthetic600/careful/medium",
        "synthetic600/hint/medium",
        "math/system/medium",
        "frozenlake/tips/small",
        "sokoban/tips/small",
        "worked/steps/small",
        "synthetic600_xsize/careful/small",
        "synthetic_flip/rev/medium",
    } <= cells
    xsize = [s for s in specs if s.cell == "synthetic600_xsize/careful/small"]
    assert all("teacher=base:medium" in s.overrides for s in xsize)
    assert {"opd", "nca", "nca_late", "dual_opd"} <= {
        s.variant for s in specs if s.cell == "synthetic_flip/rev/medium"
    }
    # The base model is the unit of the intervals: at least 5 in the headline, 3 in every block.
    assert len(grid.base_seeds) >= 5 and grid.seeds
    assert all(len(block.base_seeds) >= 3 for block in grid.blocks.values())
    headline = {
        f"{c.task}/{c.context}/{size}"
        for c in grid.cells
        for size in ((c.size,) if c.size else grid.sizes)
    }
    for cell in headline:  # every base model x every distillation seed, both variants
        runs = {(s.variant, s.base_seed, s.seed) for s in specs if s.cell == cell}
        assert {
            (v, b, s) for v in ("opd", "nca") for b in grid.base_seeds for s in grid.seeds
        } <= runs
    for c in grid.blocks["ablations"].cells:
        assert {"dual_opd", "sym_kl", "nca_b0.1", "nca_b1.0"} <= {
            s.variant for s in specs if s.cell == f"{c.task}/{c.context}/{c.size}"
        }
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    # Run folders are keyed by the overrides too: other settings never reuse a finished run.
    changed = dataclasses.replace(specs[0], overrides=(*specs[0].overrides, "x=1"))
    assert changed.name == specs[0].name and changed.run_dir_name != specs[0].run_dir_name


def test_runs_of_one_base_seed_share_one_base_model():
    """base.seed picks the base model (ctxjax.base.base_key); train.seed and the variant do not,
    so each base seed is built once and shared by its runs."""
    from ctxjax.base import base_key

    grid = grid_lib.load_grid(GRIDS["full"])
    keys: dict = {}
    for spec in grid_lib.plan(grid):
        if spec.cell != "synthetic600/careful/medium":
            continue
        cfg = load_config(None, list(spec.overrides))
        assert (cfg.base.seed, cfg.train.seed) == (spec.base_seed, spec.seed)
        model_cfg = grid.base_models.model_config(spec.size, cfg.base.vocab_size)
        key = base_key(cfg.task.name, cfg.task.options, model_cfg, cfg.base, cfg.base.seed)
        keys.setdefault(spec.base_seed, set()).add(key)
    assert all(len(k) == 1 for k in keys.values())  # one base per base seed ...
    assert len(set.union(*keys.values())) == len(grid.base_seeds)  # ... and one per seed


def test_a_cell_starts_from_its_base_model_entry():
    """A grid task names a base_models.yaml entry: its runs get that entry's task, options and SFT
    budget (one definition), and the task's own overrides come after it."""
    grid = grid_lib.load_grid(GRIDS["full"])
    entries = grid_lib.load_base_models(BASE_MODELS).entries
    by_name = {s.name: s for s in grid_lib.plan(grid)}
    for name, entry, sft_steps in (
        ("math-system-medium-nca-b4-s0", entries["math"], 1500),
        ("synthetic600-hint-medium-opd-b1-s0", entries["synthetic"], 600),
    ):
        cfg = load_config(None, list(by_name[name].overrides))
        assert (cfg.task.name, cfg.task.options) == (entry.task, entry.options)
        assert cfg.base.sft_steps == sft_steps
        assert (cfg.base.seed, cfg.train.seed) == (int(name[-4]), int(name[-1]))
        assert cfg.model.num_layers == grid.base_models.sizes[name.split("-")[2]]["num_layers"]


def test_quick_grid_extends_the_full_one():
    quick, full = grid_lib.load_grid(GRIDS["quick"]), grid_lib.load_grid(GRIDS["full"])
    assert quick.variants == full.variants
    specs = grid_lib.plan(quick)
    assert [s.name for s in specs] == [
        f"synthetic-careful-small-{v}-b{b}-s0" for b in (0, 1) for v in ("opd", "nca")
    ]
    cfg = load_config(None, list(specs[1].overrides))
    assert (cfg.train.steps, cfg.eval.examples, cfg.data.batch_size) == (6, 8, 8)
    assert (cfg.loss.beta, cfg.loss.consistency) == (0.5, "nca")
    # Its own small base budget wins over the base model entry's 2000 SFT steps (CI time).
    assert (cfg.base.sft_steps, cfg.task.options) == (150, full.tasks["synthetic"][0].options)


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
        (lambda g: g.update(base_seeds=[0, 0]), r"grid\.yaml: base_seeds: a seed is repeated"),
        (lambda g: g.update(seeds=["0"]), r"grid\.yaml: seeds: seeds are integers"),
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


def test_run_all_resumes_a_folder_an_interrupted_run_left(tmp_path, monkeypatch):
    """A run killed before its summary leaves config.json (and checkpoints): run_all resumes it
    (train.run's resume path restores the newest intact checkpoint) instead of being refused, and a
    fresh folder is not resumed."""
    import ctxjax.train

    [spec] = grid_lib.plan(grid_lib.load_grid(GRIDS["quick"]))[:1]
    calls = []

    def fake_run(cfg, *, resume=False, progress=False, **_):
        calls.append(resume)
        write_dir = cfg.train.out_dir
        os.makedirs(write_dir, exist_ok=True)
        with open(os.path.join(write_dir, "summary.json"), "w") as f:
            json.dump({"before": {}, "after": {}}, f)

    monkeypatch.setattr(ctxjax.train, "run", fake_run)
    run_all([spec], str(tmp_path / "fresh"), base_cache=str(tmp_path / "base"))
    interrupted = tmp_path / "old" / spec.run_dir_name
    interrupted.mkdir(parents=True)
    (interrupted / "config.json").write_text("{}")
    run_all([spec], str(tmp_path / "old"), base_cache=str(tmp_path / "base"))
    assert calls == [False, True]


def test_run_all_resumes_a_run_killed_after_its_starting_summary(tmp_path, monkeypatch):
    """`ctxjax.train.run` writes summary.json (the starting evaluation) when it starts: a run killed
    later leaves that summary without `after` and without `final/`, and is resumed, not reused."""
    import ctxjax.train

    [spec] = grid_lib.plan(grid_lib.load_grid(GRIDS["quick"]))[:1]
    calls = []

    def fake_run(cfg, *, resume=False, progress=False, **_):
        calls.append(resume)
        with open(os.path.join(cfg.train.out_dir, "summary.json"), "w") as f:
            json.dump({"before": {"acc_x": 0.5}, "after": {"acc_x": 0.75}}, f)

    monkeypatch.setattr(ctxjax.train, "run", fake_run)
    killed = tmp_path / spec.run_dir_name
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    (killed / "summary.json").write_text(json.dumps({"before": {"acc_x": 0.5}}))
    [rec] = run_all([spec], str(tmp_path), base_cache=str(tmp_path / "base"))
    assert calls == [True] and rec["ran"] and rec["after"] == {"acc_x": 0.75}


def _record(cell, variant, seed, base_seed=0, before=None, **after):
    return dict(
        cell=cell,
        spec=dict(
            variant=variant,
            seed=seed,
            base_seed=base_seed,
            task_name=cell.split("/")[0].rstrip("0123456789"),
        ),
        before=before or dict(acc_x=0.5, acc_xc=0.9, harm=0.0),
        after=after,
    )


def _scipy_interval(values):
    """Independent reference: scipy's t-interval around the mean with the standard error."""
    values = np.asarray(values, float)
    lo, hi = scipy_stats.t.interval(0.95, len(values) - 1, values.mean(), scipy_stats.sem(values))
    return values.mean(), lo, hi


def test_write_results_groups_cells_by_regime_and_generates_the_readme_block(tmp_path):
    assert cell_regime("synthetic", "hint") == "nudge"
    recs = [
        _record(
            cell,
            v,
            s,
            b,
            acc_x=0.9,
            acc_xc=0.8,
            harm=(h + s + 2 * b) / 100,
            n_right_x=100,
            n=96,
            mode="sampled",
            correct_x=[True] * 96,
        )
        for cell in ("synthetic/rev/small", "synthetic600/careful/small")
        for v, h in (("opd", 20), ("nca", 0))
        for b in (0, 1)
        for s in (0, 1)
    ]
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{README_BEGIN}\nold\n{README_END}\n\n## Next\n")
    env = dict(cpu="Test CPU", cores=2, machine_cores=4, python="3.11", versions={"jax": "9"})
    path = write_results(
        recs, str(tmp_path / "docs" / "results.md"), environment=env, readme=str(readme)
    )
    with open(path) as f:
        text = f.read()
    nudge, flip = text.index("### nudge"), text.index("### flip")
    # After the paired table (every cell), the regime tables: nudge cells, then flip cells.
    assert nudge < text.index("synthetic600/careful/small", nudge) < flip
    assert flip < text.index("synthetic/rev/small", nudge)
    # opd in synthetic/rev/small: base b pools its two seeds' counts, (20 + 2b) + (21 + 2b) of 200
    # pairs; the interval is over the 2 bases. Help never measured: "-".
    mean, lo, hi = _scipy_interval([41 / 200, 45 / 200])
    harm = f"{mean:.3f} [{max(lo, 0):.3f}, {hi:.3f}]"
    same = "0.900 [0.900, 0.900] | 0.800 [0.800, 0.800]"  # equal bases: a zero-width interval
    assert f"| synthetic/rev/small | opd | 2 | {same} | {harm} | - |" in text
    assert "Machine: Test CPU, 2 cores used (of 4); Python 3.11, jax 9." in text
    # OPD lowered Acc_xc (0.9 -> 0.8) in both cells, and NCA - OPD is -0.2 on every base.
    assert "NCA's mean Harm is below plain OPD's in **2 of 2** cells" in text
    assert "NCA lowers Harm in **2 of 2** cells" in text and "(the paper's kind" in text
    assert "In every cell NCA's Harm verdict is that it lowers Harm" in text
    assert "primary endpoint is greedy Harm" in text
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert saved["records"][0]["after"]["n"] == 96  # every metric and count is kept ...
    assert "correct_x" not in saved["records"][0]["after"]  # ... the per-item lists are not
    assert (
        saved["environment"] == env
        and saved["aggregate"]["synthetic/rev/small"]["opd"]["help"]["mean"] is None
        and saved["aggregate"]["synthetic/rev/small"]["opd"]["harm_floor"]["mean"] is None
        and saved["paired"]["synthetic/rev/small"]["verdict"] == "NCA lowers Harm"
    )
    assert (tmp_path / "docs" / "figures" / "harm_opd_vs_nca.png").read_bytes()[:4] == b"\x89PNG"
    # The README's block: generated from results.json alone, the text around it untouched.
    block = readme_block(load_results(str(tmp_path / "docs" / "results.json")), "docs/results.md")
    assert readme.read_text() == f"# x\n\n## Results\n\n{block}\n\n## Next\n"
    assert "(docs/figures/harm_opd_vs_nca.png)" in block and "Old protocol" not in block
    # Regenerating from the json alone gives the same page.
    with open(rewrite_results(str(tmp_path / "docs" / "results.json"))) as f:
        assert f.read() == text


def test_flip_and_retention_sections_report_what_was_measured(tmp_path):
    """The `flip:` block's cells get their own table and a line saying, from the numbers, whether
    plain OPD's Acc_x interval reached 0.8; the retention block's variants a table with retention
    on the anchor's pool, on held-out contexts, and the median step time."""
    flip_cell, ret_cell = "synthetic/rev/medium", "synthetic600/careful/medium"
    recs = []
    for b in (0, 1, 2):
        for v, acc in (("opd", 0.5), ("nca", 0.4), ("nca_late", 0.45), ("dual_opd", 0.3)):
            rec = _record(flip_cell, v, 0, b, acc_x=acc + 0.01 * b, acc_xc=0.9, harm=0.1)
            rec["spec"]["overrides"] = ["train.steps=60", "train.steps=300"]
            recs.append(rec)
        for v, pool in (("ret_opd", 0.3), ("ret_opd_anchor", 0.7)):
            rec = _record(
                ret_cell, v, 0, b, acc_x=0.8, acc_xc=0.9, harm=0.1, retention_mean=pool,
                retention_pool=pool, retention_held_out=pool / 2,
            )  # fmt: skip
            rec["step_time_s"] = 1.0 + b if v == "ret_opd_anchor" else 0.5
            recs.append(rec)
    text = page_text(dict(records=recs))
    flip = text.index("## Flip regime")
    mean, lo, hi = _scipy_interval([0.5, 0.51, 0.52])
    line = f"- {flip_cell} (300 steps): plain OPD's Acc_x {mean:.3f} [{lo:.3f}, {hi:.3f}]"
    assert f"{line}: its interval lies below 0.8." in text[flip:]
    assert f"| {flip_cell} | nca_late | 3 |" in text[flip:]
    ret = text.index("## Retention anchor")
    mean, lo, hi = _scipy_interval([1.0, 2.0, 3.0])  # a step time: clipped at 0
    row = f"| {ret_cell} | ret_opd_anchor | 3 | 0.800 [0.800, 0.800] | 0.900 [0.900, 0.900] |"
    assert row in text[ret:]
    assert (
        f"0.700 [0.700, 0.700] | 0.350 [0.350, 0.350] | {mean:.3f} [{max(lo, 0):.3f}, {hi:.3f}] |"
        in (text[ret:])
    )


def test_a_run_named_twice_is_planned_once(tmp_path):
    """A block that repeats a headline variant on a headline cell names the same run: it is planned
    (and so counted in every mean) once."""
    grid = grid_lib.load_grid(GRIDS["quick"])
    cell = grid.cells[0]
    block = grid_lib.Block(("opd", "nca"), grid.base_seeds, grid.seeds, (
        dataclasses.replace(cell, size=grid.sizes[0]),
    ))  # fmt: skip
    twice = dataclasses.replace(grid, blocks={"ablations": block})
    assert [s.run_dir_name for s in grid_lib.plan(twice)] == [
        s.run_dir_name for s in grid_lib.plan(grid)
    ]


def test_median_step_time_leaves_out_the_compiling_step(tmp_path):
    from experiments.runner import median_step_time

    assert median_step_time(str(tmp_path)) is None
    rows = [{"step": i + 1, "step_time_s": t} for i, t in enumerate([30.0, 1.0, 3.0, 2.0])]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert median_step_time(str(tmp_path)) == 2.0


def test_readme_results_block_is_what_docs_results_json_generates():
    """README's "Results" section is generated (scripts/reproduce.py, or --rewrite): edited by hand
    or left stale after a new results.json, this fails."""
    block = read_readme_block(os.path.join(ROOT, "README.md"))
    assert block is not None, "README.md has no generated results block"
    doc = load_results(os.path.join(ROOT, "docs", "results.json"))
    assert block == readme_block(doc, "docs/results.md")
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        assert f.read() == page_text(doc)


def test_old_protocol_records_say_so():
    recs = [_record("a", v, 0, harm=0.1) for v in ("opd", "nca")]
    assert protocol(recs).startswith("**Old protocol**")
    recs = [_record("a", v, 0, harm=0.1, mode="greedy") for v in ("opd", "nca")]
    assert protocol(recs) == "Evaluation: greedy, views drawn independently."


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
    assert "| cell | model | bases | acc_x |" in text and "## Where NCA did not help" in text
    assert "base seeds [0, 1] x distillation seeds [0]" in text and "Machine: " in text
    assert (out / "figures" / "harm_opd_vs_nca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("opd", "nca"):
        for base_seed in (0, 1):
            [run] = out.glob(f"synthetic-careful-small-{variant}-b{base_seed}-s0-*")
            assert (run / "summary.json").exists()
    # Two base models, one per base seed, each shared by its OPD and NCA runs.
    assert len([p for p in (out / "base").glob("synthetic-*") if p.is_dir()]) == 2
    # Both evaluation modes: every run also evaluated greedily, before and after.
    assert "## Greedy evaluation" in text
    doc = json.loads((out / "results.json").read_text())
    for rec in doc["records"]:
        assert rec["after"]["mode"] == "sampled" and rec["after"]["draws"] == 4
        # Harm's floor: the no-context view answered twice, independently (None only with Harm).
        for evaluation in (rec["before"], rec["after"]):
            assert "harm_floor" in evaluation and "excess_harm" in evaluation
        assert "harm_floor" not in rec["after_greedy"]
        assert rec["after_greedy"]["mode"] == "greedy" and rec["after_greedy"]["draws"] == 1
        assert rec["before_greedy"]["mode"] == "greedy"
    assert set(doc["greedy"]["aggregate"]["synthetic/careful/small"]) == {"base", "opd", "nca"}


@pytest.mark.slow
def test_parallel_runs_equal_the_same_run_alone(tmp_path):
    """`--jobs 2` runs each spec in a worker process that has run others before it, in an order of
    its own: the result must not depend on that. One run of the quick grid made in 2 workers (beside
    its 3 siblings) and again alone in this process, from the same base model: the same sampled
    and greedy evaluations, every per-item answer included."""
    specs = grid_lib.plan(grid_lib.load_grid(GRIDS["quick"]))
    base = str(tmp_path / "base")
    parallel = run_all(specs, str(tmp_path / "par"), base_cache=base, jobs=2, greedy=True)
    # The 4 runs share 2 base models, each built once (the builds are locked).
    assert len([p for p in (tmp_path / "base").iterdir() if p.is_dir()]) == 2
    [alone] = run_all(specs[-1:], str(tmp_path / "one"), base_cache=base, jobs=1, greedy=True)
    assert alone["ran"] and parallel[-1]["ran"]
    for key in ("after", "after_greedy", "before_greedy"):
        drop = ("seconds", "model")  # wall time and the folder evaluated, not results
        a, b = ({k: v for k, v in r[key].items() if k not in drop} for r in (alone, parallel[-1]))
        assert a == b, key


def _script_main(name: str):
    """A script's `main`, loaded from scripts/ (not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, target, argv",
    [
        ("reproduce", "reproduce", ["--quick", "--out", "OUT"]),
        ("real_model", "run_real_model", ["--model", "M", "--out", "OUT"]),
    ],
)
def test_a_diverged_run_is_one_line_and_exit_1(script, target, argv, tmp_path, monkeypatch, capsys):
    """A run of the harness that diverges stops the command with exit status 1 and one line (the
    run's own message: its step, its term and the resume command), not a traceback."""
    from ctxjax.train import Diverged

    module = _script_main(script)

    def diverge(*_, **__):
        raise Diverged("step 7: non-finite loss; resume with --resume ...")

    monkeypatch.setattr(module, target, diverge)
    argv = [str(tmp_path) if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == "diverged: step 7: non-finite loss; resume with --resume ...\n"
