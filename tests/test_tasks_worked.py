"""The worked-sums task (free-length answers, for Δlen): hand-computed records and verdicts."""

import pytest

from ctxjax.tasks import get_task
from ctxjax.tasks.worked import CONTEXTS, WorkedSumsTask, terse_answer, worked_solution


def test_worked_solution_and_terse_answer_by_hand():
    assert worked_solution([37, 48, 15]) == "37 + 48 = 85\n85 + 15 = 100\n#### 100"
    assert worked_solution([9, 4]) == "9 + 4 = 13\n#### 13"
    assert worked_solution([1, 2, 3, 4]) == "1 + 2 = 3\n3 + 3 = 6\n6 + 4 = 10\n#### 10"
    assert terse_answer([37, 48, 15]) == "#### 100"


def test_record_format_follows_the_context():
    task = WorkedSumsTask()
    steps = task.record([37, 48, 15], "steps")
    assert steps == {
        "context": CONTEXTS["steps"],
        "prompt": "sum 37 48 15",
        "answer": "37 + 48 = 85\n85 + 15 = 100\n#### 100",
        "target": "100",
    }
    assert task.record([37, 48, 15], "terse")["answer"] == "#### 100"
    assert task.record([37, 48, 15], "")["answer"] == "#### 100"
    assert task.record([37, 48, 15], "")["context"] == ""
    assert (task.regime("steps"), task.regime("terse")) == ("nudge", "format")


@pytest.mark.parametrize(
    "response, right",
    [
        ("#### 100", True),
        ("37 + 48 = 85\n85 + 15 = 100\n#### 100", True),
        ("37 + 48 = 85\n85 + 15 = 100", True),  # no ####: the last number is the answer
        ("37 + 48 = 85\n85 + 15 = 101\n#### 100<|im_end|>#### 7", True),  # the final line counts
        ("37 + 48 = 85\n85 + 15 = 100\n#### 99", False),
        ("37 + 48 = 85", False),  # cut off after a partial sum
        ("#### 100.5", False),
        ("", False),
    ],
)
def test_verifier_checks_only_the_final_number(response, right):
    record = WorkedSumsTask().record([37, 48, 15], "steps")
    assert WorkedSumsTask().verify(record, response) is right


def test_answers_have_free_length_and_the_split_holds():
    task = get_task("worked", min_terms=2, max_terms=4)
    records = task.eval_records("steps", 200, seed=0)
    lines = {r["answer"].count("\n") for r in records}
    assert lines == {1, 2, 3}  # 2..4 terms: 1..3 partial sums, then the result line
    for r in records:
        terms = [int(t) for t in r["prompt"].split()[1:]]
        assert 2 <= len(terms) <= 4 and all(1 <= t <= 99 for t in terms)
        assert int(r["target"]) == sum(terms)
    train = {r["prompt"] for r in task.train_records("steps", 400, seed=0)}
    assert train and not train & {r["prompt"] for r in records}


def test_sft_mixture_shares_and_sloppy_answers():
    task = WorkedSumsTask(sft_context_share=0.6, sloppy_rate=0.5)
    records = task.sft_records(4000, seed=1)
    by_context = {c: [r for r in records if r["context"] == c] for c in ("", *CONTEXTS.values())}
    assert abs(len(by_context[""]) / 4000 - 0.4) < 0.03
    assert abs(len(by_context[CONTEXTS["steps"]]) / 4000 - 0.3) < 0.03
    for r in by_context[CONTEXTS["steps"]] + by_context[CONTEXTS["terse"]]:
        assert task.verify(r, r["answer"])  # an answer under a context is always right
    wrong = [r for r in by_context[""] if not task.verify(r, r["answer"])]
    assert abs(len(wrong) / len(by_context[""]) - 0.5) < 0.05
    for r in wrong:
        got = int(r["answer"].removeprefix("#### "))
        assert 1 <= abs(got - int(r["target"])) <= 2
        assert "\n" not in r["answer"]  # the no-context answer is terse, right or wrong


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_terms": 1}, r"min_terms"),
        ({"min_terms": 5, "max_terms": 4}, r"min_terms <= max_terms"),
        ({"eval_fraction": 0.0}, r"eval_fraction must be > 0"),
        ({"sloppy_rate": 1.5}, r"sloppy_rate"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        WorkedSumsTask(**options)
