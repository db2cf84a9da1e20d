"""The real-checkpoint experiment (`scripts/real_model.py`): the strict plan loader, the planning of
the four parts, and the whole pipeline end to end on a tiny random HF model whose chat template
inserts a default system prompt (as SmolLM2's does): runs, per-seed and per-item JSON, the
aggregation against numpy on the runs' own answers, the page and the curves, reuse, and the time
limit. Plus the shipped contexts against their generator."""

import json
import os
import shutil

import numpy as np
import pytest
import yaml

from ctxjax import hf
from ctxjax.vocab import CHAT_TEMPLATE
from experiments import real_contexts, real_model, runner
from experiments.grid import GridError

DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are SmolLM.<|im_end|>\\n' }}{% endif %}" + CHAT_TEMPLATE
)


def _plan_dict(data: str) -> dict:
    part = dict(seeds=[0, 1], learning_rates=[1e-3], steps=2, eval_steps=[1, 2], items=4, draws=2)
    return dict(
        overrides=dict(
            data=dict(batch_size=8, max_prompt_tokens=64, max_context_prompt_tokens=64),
            rollout=dict(max_new_tokens=4),
            loss=dict(opd="reverse_kl"),
            optim=dict(warmup_steps=0, min_lr_ratio=1.0),
            eval=dict(batch_size=8, max_new_tokens=4),
            train=dict(log_every=1, checkpoint_every=0),
        ),
        contexts={
            c: dict(kind=c, train=f"{data}/{c}/train.jsonl", eval=f"{data}/{c}/eval.jsonl")
            for c in ("brief", "loud")
        },
        methods=dict(
            opd={"loss": {"beta": 0.0}},
            nca={"loss": {"beta": 0.5}},
            nca_adaptive={"loss": {"beta": 0.5, "beta_schedule": "adaptive"}},
            opd_anchor={"loss": {"beta": 0.0}, "retention": {"gamma": 0.5}},
        ),
        screen_items=4,
        screen_draws=2,
        parts=dict(
            screen=dict(contexts=["brief", "loud"], methods=["opd"], **part),
            protocol=dict(contexts=["degraded"], methods=["opd", "nca"], **part),
            start=dict(
                contexts=["degraded"],
                methods=["opd", "nca_adaptive"],
                start_kl_fraction=0.5,
                **part,
            ),
            retention=dict(
                contexts=["brief"],
                methods=["opd_anchor"],
                pool=["brief", "loud"],
                **{**part, "seeds": [0], "eval_steps": [2]},
            ),
        ),
    )


@pytest.fixture(scope="module")
def setup(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_model")
    model = str(root / "model")
    shutil.copytree(folders["student"], model)
    tokenizer = hf.load_tokenizer(model)
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    tokenizer.save_pretrained(model)
    data = root / "data"
    rules = {"brief": ("Be brief.", {"type": "max_words", "n": 2}), "loud": ("Shout.", "exact")}
    for c, (text, verifier) in rules.items():
        (data / c).mkdir(parents=True)
        for split, topics in (("train", "abcdefgh"), ("eval", "wxyz")):
            with open(data / c / f"{split}.jsonl", "w") as f:
                for t in topics:
                    record = {"prompt": f"Tell me {t}.", "context": text, "verifier": verifier}
                    f.write(json.dumps({**record, "answer": t.upper()}) + "\n")
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump(_plan_dict(str(data))))
    doc = root / "page.md"
    doc.write_text(f"# Page\n\n{real_model.BEGIN}\nold\n{real_model.END}\n\nafter\n")
    return dict(model=model, plan=str(plan), doc=str(doc), out=str(root / "runs"), root=root)


def _write(tmp_path, values: dict) -> str:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda p: p.update(bogus=1), r"top level: unknown config key 'bogus'"),
        (lambda p: p["parts"].update(later={}), r"parts: unknown part\(s\) \['later'\]"),
        (
            lambda p: p["parts"]["screen"].update(stepz=3),
            r"parts\.screen: unknown config key 'stepz'",
        ),
        (lambda p: p["parts"]["screen"].update(contexts=["nope"]), r"unknown context 'nope'"),
        (
            lambda p: p["parts"]["screen"].update(contexts=["degraded"]),
            r"unknown context 'degraded'",
        ),
        (lambda p: p["parts"]["protocol"].update(methods=["dpo"]), r"unknown method 'dpo'"),
        (
            lambda p: p["methods"].update(x={"loss": {"betta": 1}}),
            r"methods\.x: unknown config key 'loss\.betta'",
        ),
        (
            lambda p: p["overrides"].update(optim={"lr": 1}),
            r"overrides: unknown config key 'optim\.lr'",
        ),
        (
            lambda p: p["contexts"]["brief"].update(verifier="x"),
            r"contexts\.brief: unknown config key 'verifier'",
        ),
        (
            lambda p: p["contexts"]["brief"].update(train="no/such.jsonl"),
            r"contexts\.brief\.train: no file",
        ),
        (lambda p: p["parts"]["screen"].update(eval_steps=[1, 3]), r"parts\.screen\.eval_steps"),
    ],
)
def test_plan_loader_is_strict(setup, tmp_path, edit, pattern):
    values = _plan_dict(str(setup["root"] / "data"))
    edit(values)
    with pytest.raises(GridError, match=pattern):
        real_model.load_plan(_write(tmp_path, values))


def test_shipped_plan_loads_and_fits_the_budget():
    plan = real_model.load_plan()
    assert list(plan.parts) == list(real_model.PARTS)
    specs = {"screen": real_model.plan_part(plan, "screen", "/m", "/tmp/unused")}
    _, hours = real_model.budget_rows(plan, specs)
    assert len(specs["screen"]) == 16 and 0 < hours < 8
    # Reuse: the protocol's OPD runs at the screen's learning rate are the screen's own runs.
    protocol = real_model.plan_part(plan, "protocol", "/m", "/tmp/unused", ["facts_org"])
    shared = {s.run_dir_name for s in protocol} & {s.run_dir_name for s in specs["screen"]}
    assert len(shared) == 2  # seeds 0 and 1 of OPD


def test_shipped_contexts_are_the_generator_output(tmp_path):
    from ctxjax.tasks.jsonl import JsonlTask

    paths = real_contexts.write_contexts(str(tmp_path))
    for name, splits in paths.items():
        for split, path in splits.items():
            shipped = os.path.join(real_contexts.CONTEXTS_DIR, os.path.relpath(path, tmp_path))
            with open(path) as new, open(shipped) as old:
                assert new.read() == old.read(), (name, split)
        task = JsonlTask(train_file=splits["train"], eval_file=splits["eval"])
        assert len(task.contexts()) == 1 and len(task.eval_split) >= 12, name
        assert not {r["prompt"] for r in task.eval_split} & {r["prompt"] for r in task.train_split}
    # The verifiers say what the page says they do.
    task = JsonlTask(eval_file=paths["animal_rule"]["eval"])
    animal, capital = task.eval_split[0], task.eval_split[-1]
    assert task.verify(animal, "Zebra") and not task.verify(animal, "They eat grass.")
    city = capital["answer"]
    assert task.verify(capital, f"The capital is {city}.")
    assert not task.verify(capital, f"Zebra. {city}")  # the rule applied where it does not belong
    task = JsonlTask(eval_file=paths["arith_format"]["eval"])
    r = task.eval_split[0]
    assert task.verify(r, f"working 1 2 3\n#### {r['answer']}")
    assert not task.verify(r, f"#### {int(r['answer']) + 1}")


def _numpy_metrics(result: dict) -> dict:
    cx, cxc = np.asarray(result["correct_x"], bool), np.asarray(result["correct_xc"], bool)
    return dict(
        acc_x=cx.mean(),
        acc_xc=cxc.mean(),
        harm=(cx & ~cxc).sum() / cx.sum() if cx.sum() >= real_model.MIN_DENOMINATOR else None,
    )


def test_pipeline_end_to_end(setup, monkeypatch):
    # A random model degrades nothing reliably: the screen's verdict is fixed here so the parts
    # that run on the degraded contexts are planned and run.
    monkeypatch.setattr(real_model, "degraded_contexts", lambda screen: ["brief"])
    lines = []
    kw = dict(plan_path=setup["plan"], figure=str(setup["root"] / "curves.png"), n_boot=200)
    results = real_model.run_real_model(
        setup["model"], setup["out"], setup["doc"], report=lines.append, **kw
    )
    assert results["degraded"] == ["brief"]
    assert any("runs done" in line and "left, about" in line for line in lines)
    # Runs: screen 2 contexts x 2 seeds; protocol NCA x 2; start adaptive x 2 (its OPD runs are
    # the screen's); retention 1.
    summaries = glob_summaries(setup["out"])
    assert len(summaries) == 4 + 2 + 2 + 1
    screen = results["parts"]["screen"]
    assert set(screen) == {"brief@lr0.001", "loud@lr0.001"}
    cell = screen["brief@lr0.001"]
    opd = cell["methods"]["opd"]
    assert opd["seeds"] == [0, 1] and set(opd["per_seed"]) == {"0", "1"}
    # Per seed and per item: the runs' own answers, and the pooled metrics recomputed in numpy.
    means = []
    for seed, values in opd["per_seed"].items():
        (summary,) = [
            s for s in summaries.values()
            if s["config"]["train"]["seed"] == int(seed) and _plain_opd_on_brief(s["config"])
        ]  # fmt: skip
        after = summary["after"]
        assert values["per_item"]["greedy_correct_xc"] == after["correct_xc"]
        want = _numpy_metrics(after)
        assert values["greedy"]["acc_xc"] == pytest.approx(want["acc_xc"])
        assert values["sampled"]["harm_floor"] is None or 0 <= values["sampled"]["harm_floor"] <= 1
        means.append(want["acc_xc"])
        assert values["regime"].startswith(("internalized", "not internalized"))
        # The learning curve: before, then every evaluated step.
        assert sorted(map(int, opd["curves"][seed])) == [0, 1, 2]
    assert opd["greedy"]["acc_xc"]["mean"] == pytest.approx(np.mean(means))
    ci = opd["greedy"]["acc_xc"]["ci95"]
    assert ci[0] <= np.mean(means) <= ci[1]
    # OPD against the base model, paired per seed; and a verdict (or its absence) for each cell.
    base_acc = cell["base"]["greedy"]["acc_xc"]["mean"]
    assert cell["opd_vs_base"]["acc_xc"]["mean"] == pytest.approx(np.mean(means) - base_acc)
    assert "degraded" in cell["degraded"]
    # Protocol: NCA against OPD, paired, on the same seeds.
    nca = results["parts"]["protocol"]["brief@lr0.001"]["methods"]["nca"]
    assert nca["vs_opd"]["greedy"]["acc_xc"]["n_units"] == 2
    # Start: the adaptive threshold is half the screen's early reverse KL, fixed before its runs.
    adaptive = [s for s in summaries.values() if s["config"]["loss"]["beta_schedule"] == "adaptive"]
    kls = []
    for s in summaries.values():
        c = s["config"]
        if _plain_opd_on_brief(c):
            with open(os.path.join(c["train"]["out_dir"], runner.METRICS_FILE)) as f:
                kls += [
                    r["reverse_kl"]
                    for r in map(json.loads, f)
                    if "reverse_kl" in r and r["step"] <= 5
                ]
    assert len(adaptive) == 2
    for s in adaptive:
        assert s["config"]["loss"]["beta_start_kl"] == pytest.approx(0.5 * np.median(kls), 1e-5)
    # Retention: the other context is measured before and after.
    ret = results["parts"]["retention"]["brief@lr0.001"]["methods"]["opd_anchor"]["per_seed"]["0"]
    assert ret["retention_before"] is not None and ret["retention_after"] is not None

    with open(os.path.join(setup["out"], real_model.RESULTS_FILE)) as f:
        saved = json.load(f)
    assert saved["parts"]["screen"]["brief@lr0.001"]["methods"]["opd"]["per_seed"]["0"]["per_item"]
    with open(setup["doc"]) as f:
        page = f.read()
    assert page.startswith("# Page\n\n") and page.endswith(f"{real_model.END}\n\nafter\n")
    assert "old" not in page and "None" not in page and "nan" not in page
    for text in ("Endpoints, fixed before the runs", "Base-model screen", "Part: protocol",
                 "opd - base (paired)", "nca - opd (paired)", "Estimated total"):  # fmt: skip
        assert text in page, text
    assert os.path.getsize(setup["root"] / "curves.png") > 1000

    # Re-running trains and evaluates nothing, and gives the same numbers.
    def refuse(*a, **k):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(runner, "_train", refuse)
    monkeypatch.setattr("ctxjax.evaluate.evaluate_checkpoint", refuse)
    again = real_model.run_real_model(
        setup["model"], setup["out"], setup["doc"], report=lines.append, **kw
    )
    assert again["parts"] == results["parts"]


def _plain_opd_on_brief(cfg: dict) -> bool:
    """A screen run (plain OPD, the anchor off) on the `brief` context."""
    return (
        cfg["loss"]["beta"] == 0
        and not cfg["retention"]["gamma"]
        and cfg["data"]["eval_file"].endswith("brief/eval.jsonl")
    )


def glob_summaries(out: str) -> dict[str, dict]:
    found = {}
    for name in os.listdir(out) if os.path.isdir(out) else []:
        path = os.path.join(out, name, runner.SUMMARY_FILE)
        if os.path.exists(path):
            with open(path) as f:
                found[name] = json.load(f)
    return found


def test_time_limit_stops_between_runs_and_the_next_call_resumes(setup, tmp_path):
    plan = real_model.load_plan(setup["plan"])
    out = str(tmp_path / "runs")
    specs = real_model.plan_part(plan, "screen", setup["model"], out)[:2]
    lines = []
    # A deadline already past: the first run is not started.
    assert not real_model.run_specs(plan, "screen", specs, out, 0.0, lines.append)
    assert "time limit reached: 2 run(s) left" in lines[-1] and not glob_summaries(out)
    # Without a limit the runs complete; a second call finds nothing left to run.
    assert real_model.run_specs(plan, "screen", specs, out, None, lines.append)
    assert "2/2 runs done" in lines[-1] and len(glob_summaries(out)) == 2
    before = len(lines)
    assert real_model.run_specs(plan, "screen", specs, out, None, lines.append)
    assert len(lines) == before


def test_script_bad_plan_is_one_line_and_exit_2(setup, tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "real_model.py")
    spec = importlib.util.spec_from_file_location("script_real_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    values = _plan_dict(str(setup["root"] / "data"))
    values["parts"]["screen"]["sedes"] = [0]
    bad = _write(tmp_path, values)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--model", setup["model"], "--plan", bad, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plan.yaml: parts.screen: unknown config key 'sedes'" in err
    assert not os.path.exists(tmp_path / "o" / "base")  # refused before any evaluation
