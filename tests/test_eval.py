"""Evaluation entry point and report: `scripts/eval.py` end to end on a tiny checkpoint, the
metric plumbing of `evaluate_context` recomputed from its own samples, `layer_cosine` against HF
transformers run on each unpadded sequence, and `write_report`'s table parsed back against the
dict it was given."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ctxjax import hf
from ctxjax import metrics as metrics_lib
from ctxjax.base import tokenizer_corpus
from ctxjax.config import SAMPLED_EVAL_DRAWS, EvalConfig, eval_draws, load_config
from ctxjax.evaluate import (
    InputError,
    ViewAnswers,
    evaluate_checkpoint,
    evaluate_context,
    layer_cosine,
    stream_seed,
)
from ctxjax.model import ModelConfig, create_model
from ctxjax.tasks import get_task
from ctxjax.train import format_summary
from ctxjax.vocab import build_tokenizer
from experiments.eval_report import metrics_table, write_report
from experiments.tables import Stat, compare_table, format_cell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "eval.py")
CFG = ModelConfig(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1
)
# `sum` prompts only: the contexts are careful, hint and steps, so retention runs two contexts.
TASK_OPTIONS = {"families": ("sum",)}
METRIC_KEYS = (
    "acc_x",
    "acc_xc",
    "harm",
    "both_correct",
    "help",
    "delta_len",
    "n",
    "n_right_x",
    "n_wrong_x",
    "mode",
    "draws",
    "coupled_views",
    "layer_cosine",
    "retention",
    "retention_mean",
    "samples",
    "lengths_x",
    "lengths_xc",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sharpened_model(seed: int):
    """A random model with its matrices scaled up: the normal(0.02) init gives near-uniform logits,
    so greedy decoding would repeat one token; scaled, answers vary with the prompt and context."""
    model = create_model(CFG, seed=seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params))
    return model


@pytest.fixture(scope="module")
def tokenizer():
    task = get_task("synthetic")
    return build_tokenizer(tokenizer_corpus(task, task.sft_records(300, 0)), vocab_size=320)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """Two tiny HF folders with the task's tokenizer: the model and a baseline."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = []
    for name, seed in (("model", 0), ("baseline", 1)):
        path = str(root / name)
        hf.save_model(_sharpened_model(seed), path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def script_run(checkpoints, tmp_path_factory):
    """`scripts/eval.py` on the tiny model with a baseline, started in the background so that it
    overlaps the in-process tests (most of its time is imports and XLA compiles)."""
    model, baseline = checkpoints
    out = tmp_path_factory.mktemp("report")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device is enough
    proc = subprocess.Popen(
        [
            sys.executable,
            SCRIPT,
            "--model",
            model,
            "--baseline",
            baseline,
            "--task",
            "synthetic",
            "--context",
            "careful",
            "--task-option",
            "families=[sum]",
            "--examples",
            "8",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _table(md: str) -> dict[str, list[str]]:
    """{metric label: [cells after it]} of the first markdown table in `md`."""
    rows = {}
    for line in md.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] not in ("metric",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def _close(cell: str, value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return cell == "-"
    return abs(float(cell) - value) <= 5e-4 + 1e-9  # rounded to 3 decimals


class _ParityTask:
    """The synthetic task with a stand-in verdict (an even number of characters): its exact-match
    verifier seldom passes a random model's answer, which would leave harm and help untested."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def verify(self, record, response):
        return len(response) % 2 == 0


@pytest.fixture(scope="module")
def loaded(checkpoints, script_run):  # script_run: start the CLI run first, to overlap with these
    return hf.load_model(checkpoints[0]), hf.load_tokenizer(checkpoints[0])


def test_evaluate_context_metrics_match_its_samples(loaded):
    """Every metric recomputed with numpy from the returned answers (all 8 are in `samples`),
    and the embeddings' cosine exactly 1: the same response tokens sit in both views."""
    model, tokenizer = loaded
    task = _ParityTask(get_task("synthetic", **TASK_OPTIONS))
    result = evaluate_context(
        model,
        tokenizer,
        task,
        "careful",
        examples=8,
        max_new_tokens=6,
        batch_size=8,
        seed=3,
        retention=False,
    )
    samples = result["samples"]
    assert result["n"] == len(samples) == 8
    assert [s["prompt"] for s in samples] == [
        r["prompt"] for r in task.eval_records("careful", 8, 3)
    ]
    rx = np.array([len(s["y_x"]) % 2 == 0 for s in samples])
    rc = np.array([len(s["y_xc"]) % 2 == 0 for s in samples])
    assert 0 < rx.sum() < 8 or 0 < rc.sum() < 8  # the stand-in verdict is not constant
    assert result["acc_x"] == rx.mean() and result["acc_xc"] == rc.mean()
    assert result["both_correct"] == (rx & rc).mean() and result["n_right_x"] == rx.sum()
    assert result["mode"] == "greedy" and result["draws"] == 1
    harm = (rx & ~rc).sum() / rx.sum() if rx.any() else None
    help_ = (~rx & rc).sum() / (~rx).sum() if (~rx).any() else None
    assert result["harm"] == harm or math.isclose(result["harm"], harm)
    assert result["help"] == help_ or math.isclose(result["help"], help_)
    lx, lxc = np.array(result["lengths_x"]), np.array(result["lengths_xc"])
    assert lx.shape == lxc.shape == (8,) and (lx >= 1).all() and (lx <= 6).all()
    assert math.isclose(result["delta_len"], lxc.mean() / lx.mean() - 1)
    assert result["both_correct"] <= min(result["acc_x"], result["acc_xc"])
    assert result["harm"] is None or 0.0 <= result["harm"] <= 1.0
    assert "retention" not in result
    cos = result["layer_cosine"]
    assert len(cos) == CFG.num_layers + 1
    assert abs(cos[0] - 1.0) < 1e-6
    assert all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in cos)
    # The context changes this sharpened model's answers: otherwise harm/help would be trivial.
    assert any(s["y_x"] != s["y_xc"] for s in samples)


class _SameViewsTask:
    """The model evaluated against itself: every record's context is empty, so both views render
    the same tokens and answer from one distribution. One prompt repeated (or the synthetic
    prompts, `varied`), right when the answer has an even number of characters: with one prompt
    every item has the same chance p of being right, so the expected Harm is exactly 1 - p."""

    name = "same-views"

    def __init__(self, varied: bool = False):
        self.inner, self.varied = get_task("synthetic", **TASK_OPTIONS), varied

    def contexts(self):
        return {"empty": ""}

    def eval_records(self, context_name, n, seed):
        records = self.inner.eval_records("careful", n, seed)
        if not self.varied:
            records = [records[0]] * n
        return [dict(r, context="") for r in records]

    def verify(self, record, response):
        return len(response) % 2 == 0


def _same_views(model, tokenizer, task, **kw):
    kw = dict(max_new_tokens=6, batch_size=64, seed=5, retention=False, with_cosine=False) | kw
    return evaluate_context(model, tokenizer, task, "empty", **kw)


def test_same_model_greedy_harm_is_exactly_zero(tokenizer):
    """Greedy answers are deterministic: identical views give identical answers, Harm 0."""
    task = _SameViewsTask(varied=True)
    result = _same_views(_sharpened_model(0), tokenizer, task, examples=32, temperature=0.0)
    assert result["mode"] == "greedy" and result["draws"] == 1 and not result["coupled_views"]
    assert 0 < result["n_right_x"] < 32  # Harm is defined and the verdict varies
    assert result["harm"] == 0.0 and result["acc_x"] == result["acc_xc"]
    assert result["lengths_x"] == result["lengths_xc"]
    assert "harm_floor" not in result  # no sampling noise, no floor to measure


def test_same_model_sampled_harm_is_one_minus_accuracy(tokenizer):
    """Independent draws in the two views of one distribution: a pair right without the context
    is wrong with it with probability 1 - p, so Harm sits within a binomial interval of
    1 - Acc_xc. Shared sampling noise would give identical answers and Harm 0, far outside."""
    n, k = 64, 4
    model = create_model(CFG, seed=0)  # unsharpened: near-uniform logits, answers vary per draw
    result = _same_views(model, tokenizer, _SameViewsTask(), examples=n, temperature=1.0)
    assert result["mode"] == "sampled" and result["draws"] == k  # the default k when sampling
    assert result["n"] == n and len(result["lengths_x"]) == len(result["lengths_xc"]) == n * k
    q = 1.0 - result["acc_xc"]
    assert 0.2 < q < 0.8  # enough spread for the interval to separate Harm from 0
    n_right = result["n_right_x"]
    # harm ~ Binomial(n_right, 1 - p) / n_right and q ~ Binomial(n k, 1 - p) / (n k), independent.
    sigma = math.sqrt(q * (1 - q) * (1 / n_right + 1 / (n * k)))
    assert abs(result["harm"] - q) < 3.5 * sigma, (result["harm"], q, sigma)
    assert abs(result["acc_x"] - result["acc_xc"]) < 3.5 * math.sqrt(2 * q * (1 - q) / (n * k))
    # The views are one distribution, so all of that Harm is the floor: the second no-context
    # draw, independent of the first, is wrong after a right one with the same probability 1 - p.
    assert abs(result["harm_floor"] - q) < 3.5 * sigma, (result["harm_floor"], q, sigma)
    assert result["excess_harm"] == pytest.approx(result["harm"] - result["harm_floor"])
    assert abs(result["excess_harm"]) < 3.5 * math.sqrt(2) * sigma
    assert len(result["correct_x_again"]) == n * k
    assert result["correct_x_again"] != result["correct_x"]  # its own random stream


def test_coupled_views_force_same_model_harm_to_zero(tokenizer):
    """Common random numbers (the explicit option) reproduce the bias the default avoids: the
    same model in both views gives the same draws, so Harm is 0 however unreliable it is."""
    model = create_model(CFG, seed=0)
    result = _same_views(
        model, tokenizer, _SameViewsTask(), examples=64, temperature=1.0, coupled_views=True
    )
    assert result["coupled_views"] and result["draws"] == 4
    assert 0.2 < result["acc_x"] < 0.8  # the answers do vary from draw to draw
    assert result["harm"] == 0.0 and result["acc_x"] == result["acc_xc"]


def test_undefined_harm_is_none_not_zero(tokenizer):
    """No item right without the context: Harm is undefined -> None (JSON null, "-" in the
    summary), while n, n_right_x, help and its count stay."""

    class NeverRight(_SameViewsTask):
        def verify(self, record, response):
            return False

    result = _same_views(create_model(CFG, seed=0), tokenizer, NeverRight(), examples=8)
    assert result["harm"] is None and result["n_right_x"] == 0
    assert result["n"] == 8 and result["help"] == 0.0 and result["n_wrong_x"] == 8
    assert json.loads(json.dumps(result, allow_nan=False))["harm"] is None
    table = format_summary({"before": result, "after": result})
    assert re.search(r"^\| harm +\| - +\| - +\|$", table, re.M), table


def test_stream_seeds_are_distinct_per_view_and_batch():
    seeds = {stream_seed(1234, s, start) for s in range(4) for start in range(0, 512, 64)}
    assert len(seeds) == 4 * 8
    assert stream_seed(1234, 0, 64) == stream_seed(1234, 0, 64)  # deterministic


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=0.0, samples=4), "eval.samples=4 needs eval.temperature > 0"),
        (dict(temperature=0.0, coupled_views=True), "eval.coupled_views needs"),
        (dict(samples=0), "eval.samples must be >= 1"),
        (dict(temperature=-1.0), "eval.temperature must be >= 0"),
    ],
)
def test_eval_config_rejects_settings_that_do_nothing(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EvalConfig(**settings)


def test_eval_config_draws():
    assert eval_draws(1.0, None) == SAMPLED_EVAL_DRAWS == 4
    assert eval_draws(0.0, None) == eval_draws(0.0, 1) == 1 and eval_draws(0.7, 8) == 8
    cfg = load_config(None, ["eval.samples=8", "eval.coupled_views=true"])
    assert cfg.eval.samples == 8 and cfg.eval.coupled_views


def _hf_residual_streams(folder: str, sequences: list[list[int]]) -> list[np.ndarray]:
    """Per sequence, [layers+1, len(ids), D]: HF transformers' embeddings and each decoder layer's
    output (forward hooks; HF's `hidden_states[-1]` is after the final norm, ours is before it)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    streams = []
    for m in (model.model.embed_tokens, *model.model.layers):
        m.register_forward_hook(
            lambda mod, inp, out: streams.append((out[0] if isinstance(out, tuple) else out)[0])
        )
    out = []
    for ids in sequences:
        streams.clear()
        with torch.no_grad():
            model(torch.tensor([ids]))  # one unpadded sequence: positions 0..len-1, no mask needed
        out.append(np.stack([h.numpy() for h in streams]))
    return out


def test_layer_cosine_matches_hf_unpadded(checkpoints, loaded):
    """`layer_cosine` (left-padded batch, right-aligned response slots) against HF transformers run
    on each unpadded sequence alone, and `metrics.cosine_by_layer`: padding, positions and the slot
    alignment are all checked against an independent implementation."""
    model, tokenizer = loaded
    records = get_task("synthetic", **TASK_OPTIONS).eval_records("careful", 8, 3)
    # Distinct response tokens of different lengths, so a shifted slot would read another token.
    responses = [[10 + 7 * i + j for j in range(1 + i % 6)] for i in range(len(records))]
    answers = ViewAnswers(
        texts=[""] * 8, lengths=np.array([len(y) for y in responses]), tokens=responses
    )
    got = layer_cosine(model, tokenizer, records, answers, batch_size=8)

    def response_streams(with_context: bool) -> np.ndarray:  # [layers+1, total response tokens, D]
        seqs = [
            hf.render_chat(tokenizer, r["context"] if with_context else "", r["prompt"]) + y
            for r, y in zip(records, responses, strict=True)
        ]
        streams = _hf_residual_streams(checkpoints[0], seqs)
        return np.concatenate(
            [h[:, -len(y) :] for h, y in zip(streams, responses, strict=True)], axis=1
        )

    h_x, h_c = response_streams(False), response_streams(True)
    want = metrics_lib.cosine_by_layer(h_x, h_c)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (
        abs(got[0] - 1.0) < 1e-6 and (want[1:] < 0.999).all()
    )  # the context does reach the blocks


def _hand_result():
    return {
        "context": "careful",
        "n": 40,
        "acc_x": 0.625,
        "acc_xc": 0.8,
        "harm": 0.12,
        "both_correct": 0.55,
        "help": 0.6666667,
        "delta_len": float("nan"),
        "n_right_x": 25,
        "n_wrong_x": 15,
        "layer_cosine": [1.0, 0.9, 0.75, 0.5],
        "retention": {"hint": 0.45, "steps": 0.3125},
        "retention_mean": 0.38125,
        "samples": [
            {
                "prompt": "sum 1 2 3",
                "context": "system: be careful and exact",
                "answer": "6",
                "y_x": "7",
                "y_xc": "6 | 6",
            }
        ],
        "lengths_x": [2, 3, 3, 4],
        "lengths_xc": [2, 2, 5, 6],
    }


def test_write_report_table_matches_dict(tmp_path):
    baseline_result = _hand_result()  # as a greedy result: no floor recorded
    result = dict(baseline_result, harm_floor=0.1, excess_harm=0.02)
    baseline = dict(
        baseline_result,
        acc_x=0.5,
        retention={"hint": 0.9, "pirate": 0.25},
        retention_mean=0.575,
        layer_cosine=None,
    )
    paths = write_report(result, str(tmp_path), "hand", baseline=baseline)
    assert set(paths) == {"json", "markdown", "accuracy", "layer_cosine", "lengths", "retention"}
    with open(paths["markdown"]) as f:
        md = f.read()
    assert md.startswith("# hand")
    table = _table(md)
    expected = {
        "n": (40, 40),
        "Acc_x": (0.625, 0.5),
        "Acc_xc": (0.8, 0.8),
        "Harm": (0.12, 0.12),
        "Harm floor": (0.1, None),  # the baseline's was not measured: "-", not 0
        "excess Harm": (0.02, None),
        "BothCorrect": (0.55, 0.55),
        "Help": (0.6666667, 0.6666667),
        "Δlen": (None, None),
        "retention: hint": (0.45, 0.9),
        "retention: steps": (0.3125, None),
        "retention: pirate": (None, 0.25),
        "retention mean": (0.38125, 0.575),
        "cosine mean (layers 1-3)": (0.7166667, None),
        "cosine layer 1 (first block)": (0.9, None),
        "cosine layer 3 (last)": (0.5, None),
    }
    assert set(table) == set(expected)
    for label, (ours, theirs) in expected.items():
        assert _close(table[label][0], ours) and _close(table[label][1], theirs), (
            label,
            table[label],
        )
    assert table["n"] == ["40", "40"]
    assert "6 \\| 6" in md  # a `|` inside a sample answer does not split the cell
    with open(paths["json"]) as f:
        saved = json.load(f)
    assert saved["delta_len"] is None and saved["acc_x"] == 0.625  # strict JSON: NaN -> null
    assert saved["baseline"]["retention"] == {"hint": 0.9, "pirate": 0.25}
    for name in ("accuracy", "layer_cosine", "lengths", "retention"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == PNG_SIGNATURE


def test_write_report_skips_missing_plots(tmp_path):
    result = {
        k: v
        for k, v in _hand_result().items()
        if k not in ("retention", "retention_mean", "layer_cosine")
    }
    paths = write_report(result, str(tmp_path))
    assert set(paths) == {"json", "markdown", "accuracy", "lengths"}
    assert not (tmp_path / "retention.png").exists()
    assert "baseline" not in metrics_table(result)


def test_compare_table_formats_cells():
    table = compare_table(
        [
            {"name": "a", "x": 0.12345, "y": float("nan"), "k": 3},
            {"name": "b|c", "x": np.float32(2.0)},
        ],
        ["name", "x", "y", "k"],
    )
    assert table.splitlines() == [
        "| name | x | y | k |",
        "|---|---|---|---|",
        "| a | 0.123 | - | 3 |",
        "| b\\|c | 2.000 | - | - |",
    ]
    assert format_cell(True) == "True" and format_cell(None) == "-"
    # A metric over seeds: mean ± std, the mean alone for one run, "-" when undefined.
    assert format_cell(Stat(0.25, 0.0625, 0.5, 2)) == "0.250 [0.062, 0.500]"
    assert format_cell(Stat(0.25, float("nan"), float("nan"), 1)) == "0.250"
    assert format_cell(Stat(float("nan"), float("nan"), float("nan"), 0)) == "-"
    assert format_cell("two\nlines") == "two lines"


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{missing}"], r"model folder not found: .*no_such_model"),
        (
            ["--model", "{model}", "--context", "pirate"],
            r"unknown context 'pirate' for task 'synthetic'; valid: \['careful', 'hint', 'steps'\]",
        ),
        (["--model", "{model}", "--task", "chess"], r"unknown task 'chess'; valid: \["),
        (
            ["--model", "{model}", "--task-option", "colour=red"],
            r"unknown option\(s\) \['colour'\]",
        ),
        (
            ["--model", "{model}", "--baseline", "{missing}"],
            r"baseline model folder not found: .*no_such_model",
        ),
        (["--model", "{model}", "--examples", "0"], r"eval.examples must be >= 1"),
    ],
)
def test_bad_input_exits_2_naming_it(checkpoints, tmp_path, capsys, args, message):
    fill = {"missing": str(tmp_path / "no_such_model"), "model": checkpoints[0]}
    # The task and context first: a case's own --task / --context comes later and wins.
    argv = (
        ["--task", "synthetic", "--context", "careful"]
        + [a.format(**fill) for a in args]
        + [
            "--task-option",
            "families=[sum]",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    with pytest.raises(SystemExit) as exit_info:
        _load_script().main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # nothing evaluated, nothing written


def test_script_end_to_end_with_baseline(checkpoints, script_run):
    model, baseline = checkpoints
    proc, out = script_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    saved = json.loads((out / "eval.json").read_text())
    for result in (saved, saved["baseline"]):
        missing = [k for k in METRIC_KEYS if k not in result]
        assert not missing, missing
        assert result["n"] == 8
        assert sorted(result["retention"]) == ["hint", "steps"]  # the other contexts of `sum`
        assert len(result["layer_cosine"]) == CFG.num_layers + 1
        assert abs(result["layer_cosine"][0] - 1.0) < 1e-6  # embeddings: same tokens in both views
        assert result["both_correct"] <= min(result["acc_x"], result["acc_xc"])
        assert result["harm"] is None or 0.0 <= result["harm"] <= 1.0
        assert len(result["lengths_x"]) == 8 * result["draws"]
    assert saved["task_options"] == {"families": ["sum"]}
    assert saved["model"] == os.path.abspath(model)
    assert saved["baseline"]["model"] == os.path.abspath(baseline)
    md = (out / "eval.md").read_text()
    assert "## Sample answers" in md
    table = _table(md)
    assert _close(table["Acc_x"][0], saved["acc_x"]) and _close(
        table["Acc_x"][1], saved["baseline"]["acc_x"]
    )
    assert _close(table["retention mean"][1], saved["baseline"]["retention_mean"])
    assert "| metric | model | baseline |" in stdout  # the table is printed
    for name in ("accuracy", "layer_cosine", "lengths", "retention"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name


def test_evaluate_checkpoint_on_a_users_jsonl(checkpoints, tmp_path):
    """`scripts/eval.py --data FILE.jsonl`'s path: the user's records with a verifier, their only
    context picked, every metric present; a mistyped verifier is a one-line InputError."""
    records = get_task("synthetic", **TASK_OPTIONS).eval_records("careful", 6, 0)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("context", "prompt", "answer")}) + "\n"
                            for r in records))  # fmt: skip
    out = evaluate_checkpoint(
        checkpoints[0], "jsonl", "", task_options={"eval_file": str(data), "verifier": "exact"},
        examples=6, max_new_tokens=6, batch_size=8, temperature=0.0, retention=False,
        with_cosine=False,
    )  # fmt: skip
    assert out["context"] == "ctx0" and out["context_text"] == records[0]["context"]
    assert out["n"] == 6 and out["mode"] == "greedy"
    assert {"acc_x", "acc_xc", "harm", "both_correct", "delta_len"} <= set(out)
    with pytest.raises(InputError, match=r"^placement must be one of \['system', 'user'\]"):
        evaluate_checkpoint(checkpoints[0], "synthetic", "careful", placement="assistant")
    with pytest.raises(InputError, match=r"^the run's verifier: unknown verifier type 'exakt'"):
        evaluate_checkpoint(
            checkpoints[0], "jsonl", "", task_options={"eval_file": str(data), "verifier": "exakt"}
        )


def test_eval_script_needs_a_task_or_data(capsys):
    """Without --task or --data the script refuses (it used to run the digit task on any model)."""
    spec = importlib.util.spec_from_file_location("eval_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", "m", "--out", "o"])
    assert exit_info.value.code == 2
    assert "give --task NAME (and --context) or --data FILE.jsonl" in capsys.readouterr().err
