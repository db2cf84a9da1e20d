"""The real-model example's pipeline (`scripts/real_model.py`) end to end on a tiny random HF model
whose chat template inserts a default system prompt (as SmolLM2's does): the planned runs, the
results against numpy on the runs' own per-answer values, the generated page section, and reuse of
finished runs. Plus the seeds x items bootstrap on its own."""

import json
import os
import shutil

import numpy as np
import pytest

from ctxjax import hf
from ctxjax.vocab import CHAT_TEMPLATE
from experiments import real_model, runner

# SmolLM2-style: a default system prompt when the messages have none (the no-context view).
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are SmolLM.<|im_end|>\\n' }}{% endif %}" + CHAT_TEMPLATE
)
TINY_BUDGETS = (
    "data.max_prompt_tokens=64",
    "data.max_context_prompt_tokens=64",
    "rollout.max_new_tokens=4",
    "eval.max_new_tokens=4",
    "eval.examples=4",
    "eval.samples=2",
    "eval.batch_size=8",
    "train.steps=1",
    "train.checkpoint_every=0",
    "optim.warmup_steps=0",
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
    data.mkdir()
    verifier = [{"type": "max_words", "n": 2}]
    for split, topics in (("train", "abcdefgh"), ("eval", "wxyz")):
        with open(data / f"{split}.jsonl", "w") as f:
            for t in topics:
                record = {"prompt": f"Tell me {t}.", "context": "Be brief.", "verifier": verifier}
                f.write(json.dumps(record) + "\n")
    doc = root / "page.md"
    doc.write_text(f"# Page\n\n{real_model.BEGIN}\nold\n{real_model.END}\n\nafter\n")
    return dict(model=model, data=str(data), doc=str(doc), out=str(root / "runs"))


def _pooled(results: list[dict]) -> dict:
    """The numpy reference: the paper's formulas over every answer of every seed."""
    cx = np.concatenate([r["correct_x"] for r in results]).astype(bool)
    cxc = np.concatenate([r["correct_xc"] for r in results]).astype(bool)
    lx = np.concatenate([r["lengths_x"] for r in results])
    lxc = np.concatenate([r["lengths_xc"] for r in results])
    return dict(
        acc_x=cx.mean(),
        acc_xc=cxc.mean(),
        both_correct=(cx & cxc).mean(),
        harm=(cx & ~cxc).sum() / cx.sum() if cx.any() else None,
        delta_len=lxc.mean() / lx.mean() - 1,
    )


def _check(got: dict, want: dict) -> None:
    for variant, metrics in want.items():
        for metric, value in metrics.items():
            stat = got[variant][metric]
            if value is None:
                assert stat["mean"] is None and stat["ci95"] is None
            else:
                np.testing.assert_allclose(stat["mean"], value, rtol=1e-12)
                assert stat["ci95"][0] <= stat["ci95"][1]


def test_pipeline_end_to_end(setup, monkeypatch):
    monkeypatch.setattr(real_model, "DATA_DIR", setup["data"])
    args = (setup["model"], setup["out"], setup["doc"])
    results = real_model.run_real_model(*args, overrides=TINY_BUDGETS)

    summaries, greedy = {}, {}
    for name in os.listdir(setup["out"]):
        path = os.path.join(setup["out"], name, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                summaries[name] = json.load(f)
            with open(os.path.join(setup["out"], name, runner.GREEDY_FILE)) as f:
                greedy[name] = json.load(f)
    assert len(summaries) == 4  # 2 seeds x (OPD, NCA)
    runs = {}
    for name, s in summaries.items():
        variant = "nca" if "-nca-" in name else "opd"
        assert s["config"]["loss"]["beta"] == real_model.VARIANTS[variant]
        assert s["config"]["student"] == os.path.abspath(setup["model"])
        assert s["context_text"] == "Be brief."
        runs.setdefault(variant, []).append((s["config"]["train"]["seed"], s, greedy[name]))
    greedy = {v: [g for _, _, g in sorted(rs, key=lambda r: r[0])] for v, rs in runs.items()}
    runs = {v: [s for _, s, _ in sorted(rs, key=lambda r: r[0])] for v, rs in runs.items()}
    assert [s["config"]["train"]["seed"] for s in runs["nca"]] == [0, 1]

    want = {
        "base": _pooled([s["before"] for s in runs["opd"]]),
        "opd": _pooled([s["after"] for s in runs["opd"]]),
        "nca": _pooled([s["after"] for s in runs["nca"]]),
    }
    with open(os.path.join(setup["out"], runner.GREEDY_FILE)) as f:
        base_greedy = json.load(f)
    assert base_greedy["mode"] == "greedy" and base_greedy["draws"] == 1
    want_greedy = {
        "base": _pooled([base_greedy]),
        "opd": _pooled(greedy["opd"]),
        "nca": _pooled(greedy["nca"]),
    }
    for section, wanted in (("metrics", want), ("greedy", want_greedy)):
        _check(results[section], wanted)
    # The per-answer values are the ones the evaluation's own metrics came from; with equal item
    # counts the pooled accuracy is the mean of the runs' accuracies.
    for s in runs["opd"] + runs["nca"]:
        for view in ("x", "xc"):
            assert np.mean(s["after"][f"correct_{view}"]) == pytest.approx(
                s["after"][f"acc_{view}"]
            )
    accs = [s["after"]["acc_xc"] for s in runs["nca"]]
    assert results["metrics"]["nca"]["acc_xc"]["mean"] == pytest.approx(np.mean(accs))
    cos = [np.mean(s["after"]["layer_cosine"][1:]) for s in runs["nca"]]
    assert results["cosine"]["nca"]["mean"]["range"] == pytest.approx([min(cos), max(cos)])

    with open(os.path.join(setup["out"], real_model.RESULTS_FILE)) as f:
        assert json.load(f)["metrics"] == results["metrics"]
    with open(setup["doc"]) as f:
        page = f.read()
    assert page.startswith("# Page\n\n") and page.endswith(f"{real_model.END}\n\nafter\n")
    assert (
        "old" not in page
        and "OPD + NCA" in page
        and "NCA - OPD (paired)" in page
        and "Greedy:" in page
    )
    assert "None" not in page

    # Re-running trains nothing (every run has its summary) and gives the same results.
    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "_train", refuse)
    monkeypatch.setattr("ctxjax.evaluate.evaluate_checkpoint", refuse)  # greedy evals reused
    again = real_model.run_real_model(*args, overrides=TINY_BUDGETS)
    assert again["metrics"] == results["metrics"] and again["greedy"] == results["greedy"]


def _result(cx, cxc, lx, lxc):
    cx, cxc = np.asarray(cx, bool), np.asarray(cxc, bool)
    n, k = cx.shape
    return dict(
        n=n,
        draws=k,
        correct_x=cx.ravel().tolist(),
        correct_xc=cxc.ravel().tolist(),
        lengths_x=np.ravel(lx).tolist(),
        lengths_xc=np.ravel(lxc).tolist(),
    )


def test_bootstrap_pairs_variants_and_spans_seeds():
    rng = np.random.default_rng(0)
    seeds = [
        _result(rng.random((30, 4)) < 0.5, rng.random((30, 4)) < 0.8, rng.integers(1, 9, (30, 4)),
                rng.integers(1, 9, (30, 4)))
        for _ in range(3)
    ]  # fmt: skip
    out = real_model.bootstrap({"opd": seeds, "nca": seeds}, n_boot=200)
    for metric, stat in out["nca-opd"].items():  # the same answers: every paired difference is 0
        assert stat["mean"] == 0 and stat["ci95"] == [0, 0], metric
    # A seed far from the others widens the interval beyond what items alone give.
    shifted = [*seeds[:2], _result(np.ones((30, 4)), np.ones((30, 4)), np.ones((30, 4)),
                                   np.ones((30, 4)))]  # fmt: skip
    wide = real_model.bootstrap({"opd": shifted}, n_boot=200)["opd"]["acc_x"]["ci95"]
    narrow = real_model.bootstrap({"opd": seeds}, n_boot=200)["opd"]["acc_x"]["ci95"]
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    with pytest.raises(ValueError, match="share seeds and items"):
        real_model.bootstrap({"opd": seeds, "nca": seeds[:2]})


def test_shipped_prompts_are_the_generator_output(tmp_path):
    """configs/real_model/ holds exactly what `write_prompts` writes, and the task reads it: no eval
    topic is trained on, and every eval record is checked by the chosen verifier."""
    from ctxjax.tasks.jsonl import JsonlTask

    paths = real_model.write_prompts(str(tmp_path))
    for split, path in paths.items():
        with open(path) as new, open(os.path.join(real_model.DATA_DIR, f"{split}.jsonl")) as old:
            assert new.read() == old.read(), split
    task = JsonlTask(train_file=paths["train"], eval_file=paths["eval"])
    assert len(task.train_split) >= 200 and len(task.eval_split) >= 64
    assert task.contexts() == {"ctx0": real_model.SYSTEM_PROMPT}
    assert not {r["prompt"] for r in task.eval_split} & {r["prompt"] for r in task.train_split}
    record = task.eval_split[0]
    assert task.verify(record, "Rainbows are light split by rain drops.")
    assert not task.verify(record, "Rainbows are light split by rain drops, and")  # unfinished
    assert not task.verify(record, " ".join(["word"] * 25) + " more.")  # 26 words
