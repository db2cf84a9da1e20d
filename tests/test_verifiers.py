"""Verifiers (`ctxjax.tasks.verifiers`) and the JSONL task (`ctxjax.tasks.jsonl`): every verifier
right and wrong, lists, the `module:function` path, load-time errors naming file, line and key,
the held-out split against a CRC32 computed here, and `evaluate_context` end to end on a tiny
random model."""

import json
import os
import zlib

import jax
import numpy as np
import pytest
from flax import nnx

from ctxjax.config import load_config
from ctxjax.evaluate import evaluate_context
from ctxjax.model import ModelConfig, create_model
from ctxjax.tasks import Task
from ctxjax.tasks.jsonl import JsonlTask
from ctxjax.tasks.verifiers import compile_verifier, verify
from ctxjax.train import load_task
from ctxjax.vocab import build_tokenizer


def answer_is_upper(record, response):
    """A user verifier, imported by `module:function` name."""
    return response == record["answer"].upper()


def _check(spec, record, response):
    verifier = compile_verifier(spec)
    verifier.check(record)
    return verify(verifier, record, response)


MCQ = {"options": ["Paris", "Rome", "New York"], "answer": "B"}

CASES = [
    # (spec, record, response, right)
    ("exact", {"answer": "Paris"}, "  Paris\n", True),
    ("exact", {"answer": "Paris"}, "Paris<|im_end|>junk", True),
    ("exact", {"answer": "Paris"}, "paris", False),
    ("exact", {"answer": "Paris"}, "Paris.", False),
    ("normalized", {"answer": "Hello, World!"}, "hello   world", True),
    ("normalized", {"answer": "U.S.A."}, "usa", True),
    ("normalized", {"answer": "Hello, World!"}, "hello word", False),
    ("number", {"answer": "1,000"}, "The total is 1000.", True),
    ("number", {"answer": "#### 3.5"}, "so 3 + 0.50 = 3.50", True),
    ("number", {"answer": "42"}, "#### 42 and later 7", True),
    ("number", {"answer": "42"}, "first 42, then 43", False),
    ("number", {"answer": "42"}, "no number", False),
    ("choice", MCQ, "B", True),
    ("choice", MCQ, "The answer is Rome.", True),
    ("choice", {**MCQ, "answer": "rome"}, "(B)", True),
    ("choice", MCQ, "The answer is A.", False),
    ("choice", MCQ, "New York", False),
    ({"type": "regex", "pattern": r"\d+ apples"}, {}, "I have 12 apples now", True),
    ({"type": "regex", "pattern": r"\d+ apples", "mode": "fullmatch"}, {}, "12 apples", True),
    (
        {"type": "regex", "pattern": r"\d+ apples", "mode": "fullmatch"},
        {},
        "I have 12 apples",
        False,
    ),
    ("regex", {"answer": r"ye[sp]"}, "Yep, yes", True),
    ("regex", {"answer": r"ye[sp]"}, "no", False),
    ({"type": "ends_with", "text": "Over."}, {}, "Roger. Over.\n", True),
    ({"type": "ends_with", "text": "Over."}, {}, "Over. Roger.", False),
    ({"type": "max_words", "n": 3}, {}, "one two three", True),
    ({"type": "max_words", "n": 3}, {}, "one two three four", False),
    ({"type": "max_sentences", "n": 2}, {}, "It is 3.5 now. Bye!", True),
    ({"type": "max_sentences", "n": 2}, {}, "One. Two! Three?", False),
    ({"type": "max_sentences", "n": 2}, {}, "One. Two. trailing words", False),
    ({"type": "contains", "text": "please"}, {}, "yes please", True),
    ({"type": "contains", "text": ["yes", "please"]}, {}, "yes thanks", False),
    ({"type": "not_contains", "text": ["sorry", "cannot"]}, {}, "Sure, here it is", True),
    ({"type": "not_contains", "text": ["sorry", "cannot"]}, {}, "I cannot", False),
    (f"{__name__}:answer_is_upper", {"answer": "abc"}, "ABC", True),
    ({"type": "python", "fn": f"{__name__}:answer_is_upper"}, {"answer": "abc"}, "abc", False),
]


@pytest.mark.parametrize("spec, record, response, right", CASES)
def test_each_verifier_right_and_wrong(spec, record, response, right):
    assert _check(spec, record, response) is right


def test_a_list_needs_every_part():
    spec = ["number", {"type": "max_words", "n": 3}, {"type": "ends_with", "text": "!"}]
    record = {"answer": "7"}
    assert _check(spec, record, "It's 7!")
    assert not _check(spec, record, "It's 8!")  # wrong number
    assert not _check(spec, record, "It is 7 now!")  # too many words
    assert not _check(spec, record, "It's 7.")  # wrong ending
    assert _check(tuple(spec), record, "It's 7!")  # a config may hold the list as a tuple


@pytest.mark.parametrize(
    "spec, message",
    [
        ("exactly", "unknown verifier type 'exactly'; valid: ['exact'"),
        ({"type": "max_words"}, "verifier 'max_words': 'n' must be an int >= 1, got None"),
        ({"type": "max_words", "n": 5, "m": 1}, "verifier 'max_words' takes ['n'], got unknown"),
        ({"type": "regex", "pattern": "("}, "verifier 'regex': regex 'pattern' '(' is invalid"),
        ({"type": "regex", "mode": "match"}, "regex 'mode' must be one of ['search', 'fullmatch']"),
        ({"type": "contains", "text": []}, "'text' must be a non-empty string or list"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz:fn'"),
        (f"{__name__}:missing_fn", f"cannot import '{__name__}:missing_fn'"),
        ([], "an empty verifier list"),
        (3, "a verifier is a type name"),
    ],
)
def test_bad_spec_is_one_line_error(spec, message):
    with pytest.raises(ValueError) as info:
        compile_verifier(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec, record, message",
    [
        ("exact", {"prompt": "p"}, "needs the record's 'answer'"),
        ("number", {"answer": "none"}, "'answer' 'none' holds no number"),
        ("choice", {"answer": "A"}, "needs the record's 'options'"),
        ("choice", {"options": ["x", "y"], "answer": "C"}, "neither a letter A-B nor the text"),
        ("regex", {"answer": "("}, "'answer' is not a valid regex"),
    ],
)
def test_record_missing_what_its_verifier_reads(spec, record, message):
    with pytest.raises(ValueError, match=message):
        compile_verifier(spec).check(record)


# ---------------------------------------------------------------------------------------------
# JsonlTask


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_load_errors_name_file_line_and_key(tmp_path):
    good = {"prompt": "p0", "context": "Be terse.", "answer": "a", "verifier": "exact"}
    cases = [
        ({"prompt": "p1", "answer": "a", "verifier": "nope"}, {}, "'verifier': unknown verifier"),
        (
            {"prompt": "p1"},
            {"verifier": "exact"},
            "the run's verifier 'exact': needs the record's 'answer'",
        ),
        (
            {"prompt": "p1", "answer": "A", "verifier": "choice"},
            {},
            "'verifier' 'choice': needs the record's 'options'",
        ),
        (
            {"prompt": "p1", "verifier": {"type": "python", "fn": "nowhere_xyz:f"}},
            {},
            "'verifier': verifier 'python': cannot import 'nowhere_xyz:f'",
        ),
        ({"prompt": "p1", "answer": "a"}, {}, "no verifier: give the record a 'verifier'"),
        (
            {"prompt": "p1", "answer": "a"},
            {"context": "", "verifier": "exact"},
            "nothing to distill",
        ),
    ]
    path = tmp_path / "eval.jsonl"
    for bad, options, message in cases:
        # The blank second line is skipped but counted: the bad record is on line 3.
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError) as info:
            JsonlTask(eval_file=str(path), **{"context": "Be terse.", **options})
        text = str(info.value)
        assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text, text


def test_bad_run_verifier_and_split_options(tmp_path):
    path = _write(tmp_path / "eval.jsonl", [{"prompt": "p", "context": "c", "answer": "a"}])
    with pytest.raises(ValueError, match="the run's verifier: unknown verifier type 'x'"):
        JsonlTask(eval_file=path, verifier="x")
    with pytest.raises(ValueError, match="needs train_file or eval_file"):
        JsonlTask()
    with pytest.raises(ValueError, match=r"eval_file='b' and eval_fraction=0\.5 both give"):
        JsonlTask(train_file="a", eval_file="b", eval_fraction=0.5)
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        JsonlTask(train_file="a", eval_fraction=1.0)


def test_preset_combines_with_own_data_and_split(tmp_path):
    """The SmolLM2 preset names its own eval file: a user's train file with a held-out share
    conflicts with it, the error says how to clear it, and the documented override works."""
    path = _write(
        tmp_path / "train.jsonl", [{"prompt": f"q{i}?", "answer": "a"} for i in range(40)]
    )
    own = [
        "task.name=jsonl",
        f"student={tmp_path}",  # a run on one's own records names its model; not loaded here
        f"data.train_file={path}",
        "data.context=Be terse.",
        "task.options.verifier=exact",
        "task.options.eval_fraction=0.25",
    ]
    preset = os.path.join(ROOT, "configs", "smollm2_cpu.yaml")
    with pytest.raises(ValueError, match=r"data\.eval_file=null clears"):
        load_task(load_config(preset, own))
    task = load_task(load_config(preset, [*own, "data.eval_file=null"]))
    held = {r["prompt"] for r in task.eval_split}
    assert held and held.isdisjoint(r["prompt"] for r in task.train_split)
    assert len(held) + len(task.train_split) == 40


def test_heldout_split_is_disjoint_deterministic_and_by_prompt(tmp_path):
    prompts = [f"question {i}?" for i in range(60)]
    # Every prompt twice, under two contexts, interleaved: a split by prompt keeps both together.
    rows = [
        {"prompt": p, "context": c, "answer": str(i)}
        for i, p in enumerate(prompts)
        for c in ("Be terse.", "Be loud.")
    ]
    path = _write(tmp_path / "train.jsonl", rows)
    task = JsonlTask(train_file=path, eval_fraction=0.3, verifier="number")
    expected_eval = {p for p in prompts if zlib.crc32(p.encode()) % 10_000 < 3_000}
    eval_prompts = {r["prompt"] for r in task.eval_split}
    train_prompts = {r["prompt"] for r in task.train_split}
    assert eval_prompts == expected_eval and train_prompts == set(prompts) - expected_eval
    assert 0 < len(eval_prompts) < len(prompts)
    assert len(task.eval_split) == 2 * len(eval_prompts)
    # Another task over the file with its lines reversed splits the same way.
    path2 = _write(tmp_path / "reversed.jsonl", rows[::-1])
    task2 = JsonlTask(train_file=path2, eval_fraction=0.3, verifier="number")
    assert {r["prompt"] for r in task2.eval_split} == eval_prompts


def test_contexts_records_and_verify(tmp_path):
    rows = [
        {"prompt": "a?", "answer": "1"},
        {"prompt": "b?", "context": "Be loud.", "answer": "2"},
        {"prompt": "c?", "answer": "3", "verifier": {"type": "max_words", "n": 1}},
        {"prompt": "d?", "context": "Be loud.", "answer": "4"},
    ]
    path = _write(tmp_path / "eval.jsonl", rows)
    task = JsonlTask(eval_file=path, context="Be terse.", verifier="number")
    assert isinstance(task, Task)
    assert task.contexts() == {"ctx0": "Be terse.", "ctx1": "Be loud."}
    assert task.context_name("Be loud.") == "ctx1" and task.regime("ctx0") == "nudge"
    loud = task.eval_records("ctx1", 10, seed=0)  # never repeated past the pool
    assert sorted(r["prompt"] for r in loud) == ["b?", "d?"]
    assert all(r["context"] == "Be loud." for r in loud)
    assert task.eval_records("ctx1", 10, seed=5) == task.eval_records("ctx1", 10, seed=5)
    assert len(task.eval_records("ctx0", 1, seed=0)) == 1
    terse = {r["prompt"]: r for r in task.eval_records("ctx0", 2, seed=0)}
    assert task.verify(terse["a?"], "it is 1") and not task.verify(terse["a?"], "it is 2")
    # The record's own verifier replaces the run's: one word, whatever the number.
    assert task.verify(terse["c?"], "seven") and not task.verify(terse["c?"], "it is 3")
    with pytest.raises(ValueError, match="unknown context 'ctx2'"):
        task.eval_records("ctx2", 1, 0)
    with pytest.raises(ValueError, match="no SFT mixture"):
        task.sft_records(1, 0)
    with pytest.raises(ValueError, match="no train records with context 'ctx0'"):
        task.train_records("ctx0", 1, 0)


def test_train_records_repeat_their_pool(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(3)]
    task = JsonlTask(train_file=_write(tmp_path / "t.jsonl", rows), context="Be terse.")
    records = task.train_records("ctx0", 7, seed=1)
    assert len(records) == 7 and sorted({r["prompt"] for r in records}) == ["q0", "q1", "q2"]
    assert sorted(r["prompt"] for r in records[3:6]) == ["q0", "q1", "q2"]  # a whole 2nd pass
    assert records == task.train_records("ctx0", 7, seed=1)


def test_evaluate_context_end_to_end(tmp_path):
    rows = [
        {"prompt": f"say {i} {j}", "context": ctx, "answer": str(i + j)}
        for i, j in [(1, 2), (3, 4), (5, 1), (2, 2)]
        for ctx in ("Add the numbers.", "Answer in one word.")
    ]
    path = _write(tmp_path / "eval.jsonl", rows)
    task = JsonlTask(eval_file=path, verifier={"type": "max_words", "n": 2})
    tokenizer = build_tokenizer([r["prompt"] for r in rows] + ["Add the numbers."], vocab_size=300)
    cfg = ModelConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
    )
    model = create_model(cfg, seed=0)
    # Scaled-up matrices: the 0.02 init gives near-uniform logits and one repeated token.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params))
    result = evaluate_context(model, tokenizer, task, "ctx0", examples=4, max_new_tokens=6)
    for key in ("acc_x", "acc_xc", "harm", "both_correct", "layer_cosine", "retention"):
        assert key in result, key
    assert set(result["retention"]) == {"ctx1"}
    # acc_x recomputed from the answers it reports, counting words here.
    words_ok = [len(s["y_x"].split()) <= 2 for s in result["samples"]]
    assert result["acc_x"] == pytest.approx(np.mean(words_ok))
    assert [s["context"] for s in result["samples"]] == ["Add the numbers."] * 4


def answer_as_text(record, response):
    """A faulty user verifier: the string 'False' (truthy) instead of the bool."""
    return str(response == record["answer"])


def divides_by_length(record, response):
    """A faulty user verifier: raises on an empty response."""
    return 1 / len(response) > 0


def numpy_verdict(record, response):
    return np.bool_(response == record["answer"])


def test_a_verifier_must_return_a_bool_and_errors_name_the_record(tmp_path):
    rows = [{"prompt": "a?", "context": "Be terse.", "answer": "1"}]
    path = _write(tmp_path / "eval.jsonl", rows)
    task = JsonlTask(eval_file=path, verifier=f"{__name__}:answer_as_text")
    (record,) = task.eval_split
    # bool('False') is True: a wrong answer must not pass; one line naming verifier, record, value.
    with pytest.raises(ValueError, match="returned 'False' \\(str\\)") as e:
        task.verify(record, "2")
    message = str(e.value)
    assert f"{path}:1" in message and f"{__name__}:answer_as_text" in message
    assert "\n" not in message
    raising = JsonlTask(eval_file=path, verifier=f"{__name__}:divides_by_length")
    with pytest.raises(ValueError, match="raised ZeroDivisionError") as e:
        raising.verify(raising.eval_split[0], "")
    assert f"{path}:1" in str(e.value) and "divides_by_length" in str(e.value)
    # numpy's bool is a bool.
    numpy_task = JsonlTask(eval_file=path, verifier=f"{__name__}:numpy_verdict")
    assert numpy_task.verify(numpy_task.eval_split[0], "1") is True
    assert numpy_task.verify(numpy_task.eval_split[0], "2") is False
