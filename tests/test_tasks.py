"""Task generators and verifiers: hand-written answers, self-consistency, determinism, splits."""

import itertools
import json
import re
from fractions import Fraction

import numpy as np
import pytest

from ctxjax.tasks import TASKS, Task, get_task
from ctxjax.tasks.common import read_jsonl
from ctxjax.tasks.gridworld import (
    FrozenLakeTask,
    SokobanTask,
    lake_outcome,
    parse_plan,
    parse_sokoban,
    sokoban_outcome,
    solve_lake,
    solve_sokoban,
)
from ctxjax.tasks.qa import (
    DEFAULT_MCQ_SYSTEM,
    DEFAULT_MCQ_TEXT_SYSTEM,
    LETTERS,
    MATH_SAMPLE,
    MCQ_SAMPLE,
    MathTask,
    MCQTask,
    extract_choice,
    extract_number,
    generated_mcq_items,
    load_math_jsonl,
    load_mcq_jsonl,
    parse_number,
)
from ctxjax.tasks.synthetic import CONTEXTS, SyntheticTask, default_answer, default_options

# ---------------------------------------------------------------------------------------------
# Registry and the record contract


def test_registry_builds_every_task_and_rejects_unknown_names():
    assert sorted(TASKS) == ["frozenlake", "math", "mcq", "sokoban", "synthetic", "worked"]
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
    with pytest.raises(ValueError, match=r"valid: .*'synthetic'"):
        get_task("chess")
    with pytest.raises(ValueError, match="sloppy_rate"):
        get_task("synthetic", sloppy_rat=0.3)
    assert get_task("synthetic", sloppy_rate=0.3).sloppy_rate == 0.3


@pytest.mark.parametrize("name", sorted(TASKS))
def test_records_follow_the_contract(name):
    task = get_task(name)
    for context_name, text in task.contexts().items():
        assert task.regime(context_name) in ("flip", "nudge", "format")
        records = task.eval_records(context_name, 8, seed=0)
        assert len(records) == 8
        for r in records:
            assert r["context"] == text
            assert all(isinstance(r[k], str) and r[k] for k in ("prompt", "answer"))
            json.dumps(r)  # plain data, so records can travel through any pipeline
    for r in task.sft_records(30, seed=0):
        assert isinstance(r["context"], str) and r["context"] in ("", *task.contexts().values())
    with pytest.raises(ValueError, match="valid"):
        task.eval_records("no_such_context", 1, seed=0)
    with pytest.raises(ValueError, match="seed"):
        task.eval_records(next(iter(task.contexts())), 1, seed=-1)


@pytest.mark.parametrize("name", ["synthetic", "frozenlake", "sokoban"])
def test_tiny_model_tasks_are_short(name):
    # Rough token counts: one per word for text, one per symbol for a grid row.
    task = get_task(name)
    for context_name, text in task.contexts().items():
        assert len(text.split()) <= 12
        for r in task.eval_records(context_name, 50, seed=1):
            _, *rows = r["prompt"].split()
            n_prompt = 1 + (sum(len(row) for row in rows) if name != "synthetic" else len(rows))
            assert n_prompt <= 24, r["prompt"]
            assert len(r["answer"].split()) <= 16, r["answer"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic_by_seed(name):
    task = get_task(name)
    context_name = next(iter(task.contexts()))
    assert task.eval_records(context_name, 20, seed=3) == task.eval_records(context_name, 20, 3)
    assert task.sft_records(20, seed=3) == get_task(name).sft_records(20, seed=3)
    assert task.eval_records(context_name, 20, seed=3) != task.eval_records(context_name, 20, 4)
    assert task.sft_records(20, seed=3) != task.sft_records(20, seed=4)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_answers_verify_and_mutated_answers_do_not(name):
    task = get_task(name)
    for context_name in task.contexts():
        for r in task.eval_records(context_name, 40, seed=2):
            assert task.verify(r, r["answer"]), r
            assert task.verify(r, r["answer"] + "\n" + r["prompt"]), "trailing junk line"
            assert task.verify(r, r["answer"] + "<|im_end|> 0 1 2"), "junk after a marker"
            assert not task.verify(r, _mutate(name, r)), r
            for junk in ("", "   \n  ", "<|im_end|>", "?? !!"):
                assert not task.verify(r, junk)


def _mutate(name, record):
    """A wrong answer for `record`, built without the task's own code."""
    answer = record["answer"]
    if name in ("frozenlake", "sokoban"):
        return " ".join(answer.split()[:-1])  # a prefix of a shortest plan never finishes
    if name == "mcq":
        return "ABCDEFGHIJ"[(record["answer_index"] + 1) % len(record["options"])]
    if name == "math":
        return f"#### {float(Fraction(record['target']) + 1)}"
    words = answer.split()
    last = words[-1]
    if last.isdigit():
        words[-1] = str(int(last) + 1)
    else:
        words[-1] = "zero" if last != "zero" else "one"
    return " ".join(words)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_eval_prompts_never_appear_in_sft(name):
    task = get_task(name)
    eval_prompts = {r["prompt"] for c in task.contexts() for r in task.eval_records(c, 100, 5)}
    sft_prompts = {r["prompt"] for r in task.sft_records(600, 5)}
    assert eval_prompts and sft_prompts and not eval_prompts & sft_prompts


# ---------------------------------------------------------------------------------------------
# Synthetic

SEQ_314 = {  # "seq 3 1 4" under each context, written by hand
    "add3": "6 4 7",
    "rev": "4 1 3",
    "sort": "1 3 4",
    "drop1": "1 4",
    "words": "three one four",
    "pirate": "arr 3 1 4",
}


@pytest.mark.parametrize("context_name, expected", sorted(SEQ_314.items()))
def test_synthetic_seq_rules_by_hand(context_name, expected):
    task = SyntheticTask()
    assert CONTEXTS[context_name].answer("seq", (3, 1, 4)) == expected
    record = {"context": task.contexts()[context_name], "prompt": "seq 3 1 4", "answer": expected}
    assert task.verify(record, expected)
    assert task.verify(record, f"  {expected.upper()}  \nseq 1 2 3")
    assert task.verify(record, expected + "</s>junk")
    assert not task.verify(record, "3 1 4")  # the no-context COPY answer
    assert not task.verify(record, expected + " 9")
    assert not task.verify(record, expected.split()[0])


def test_synthetic_nudge_and_format_answers_by_hand():
    assert default_answer("seq", (3, 1, 4)) == "3 1 4"
    assert default_answer("sum", (3, 1, 4)) == "8"
    assert default_answer("max", (3, 1, 4)) == "4"
    assert CONTEXTS["careful"].answer("sum", (9, 9, 7)) == "25"
    assert CONTEXTS["hint"].answer("max", (2, 0, 2)) == "2"
    assert CONTEXTS["steps"].answer("sum", (3, 1, 4)) == "3 + 1 + 4 = 8"
    task = SyntheticTask()
    record = {"context": "", "prompt": "sum 9 9 7", "answer": "25"}
    assert task.verify(record, "25") and not task.verify(record, "24")
    assert not task.verify(record, "2 5")


def _rule_from_prompt(context_name, prompt):
    """The right answer recomputed from the prompt text, independently of the task module."""
    family, *tokens = prompt.split()
    d = [int(t) for t in tokens]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return {
        "add3": " ".join(str((x + 3) % 10) for x in d),
        "rev": " ".join(tokens[::-1]),
        "sort": " ".join(sorted(tokens)),
        "drop1": " ".join(tokens[1:]),
        "words": " ".join(names[x] for x in d),
        "pirate": "arr " + " ".join(tokens),
        "steps": " + ".join(tokens) + f" = {sum(d)}",
        "careful": str(sum(d) if family == "sum" else max(d)),
        "hint": str(sum(d) if family == "sum" else max(d)),
    }[context_name]


def test_synthetic_eval_records_follow_their_context():
    task = SyntheticTask()
    regimes = {c: task.regime(c) for c in task.contexts()}
    assert regimes == {
        "add3": "flip",
        "rev": "flip",
        "sort": "flip",
        "drop1": "flip",
        "careful": "nudge",
        "hint": "nudge",
        "words": "format",
        "pirate": "format",
        "steps": "format",
    }
    for context_name in task.contexts():
        for r in task.eval_records(context_name, 30, seed=1):
            assert r["answer"] == _rule_from_prompt(context_name, r["prompt"])
            assert 3 <= len(r["prompt"].split()) - 1 <= 6


def test_synthetic_sft_mixture_and_sloppy_rate():
    rate = 0.3
    task = SyntheticTask(sloppy_rate=rate)
    records = task.sft_records(4000, seed=0)
    names = {r["context_name"] for r in records}
    assert names == {""} | set(task.contexts())
    no_ctx = [r for r in records if r["context"] == ""]
    # Default weights: "none" gets one share per family (3 of 12 shares).
    assert abs(len(no_ctx) / len(records) - 3 / 12) < 0.03
    for r in records:
        right = default_answer(r["family"], tuple(r["digits"]))
        if r["context"]:
            assert r["answer"] == _rule_from_prompt(r["context_name"], r["prompt"])
        elif r["family"] == "seq":
            assert r["answer"] == right  # COPY is never sloppy
        if not r["context"]:
            assert r["sloppy"] == (r["answer"] != right)
        else:
            assert not r["sloppy"]
    nudge = [r for r in no_ctx if r["family"] in ("sum", "max")]
    wrong = np.mean([r["answer"] != default_answer(r["family"], tuple(r["digits"])) for r in nudge])
    assert abs(wrong - rate) < 4 * np.sqrt(rate * (1 - rate) / len(nudge))
    clean = SyntheticTask(sloppy_rate=0.0).sft_records(300, seed=0)
    assert not any(r["sloppy"] for r in clean)


def test_synthetic_options():
    task = SyntheticTask(
        families=["seq"],
        sft_weights={
            "none": 0.0,
            "add3": 0.0,
            "sort": 0.0,
            "drop1": 0.0,
            "words": 0.0,
            "pirate": 0.0,
        },
    )
    assert set(task.contexts()) == {"add3", "rev", "sort", "drop1", "words", "pirate"}
    assert {r["context_name"] for r in task.sft_records(50, seed=0)} == {"rev"}
    with pytest.raises(ValueError, match=r"valid: .*'rev'"):
        task.eval_records("careful", 5, seed=0)
    assert hash(task) == hash(SyntheticTask(families=("seq",), sft_weights=dict(task.sft_weights)))
    for bad in (
        dict(families=("seq", "chess")),
        dict(families=()),
        dict(min_len=1),
        dict(min_len=5, max_len=4),
        dict(sloppy_rate=1.5),
        dict(heldout_fraction=0.0),
        dict(sft_weights={"rev": -1.0}),
        dict(sft_weights={"reverse": 1.0}),
    ):
        with pytest.raises(ValueError):
            SyntheticTask(**bad)


# ---------------------------------------------------------------------------------------------
# Grid worlds

LAKE = ("S.H.", "....", ".H.H", "...G")


def test_parse_plan():
    assert parse_plan("R R D D") == ["R", "R", "D", "D"]
    assert parse_plan("rrdd\nL L") == ["R", "R", "D", "D"]
    assert parse_plan(" R, D ,U<|im_end|>L") == ["R", "D", "U"]
    for bad in ("", "  \n ", "R X D", "UP", "R 2", "<eos>R"):
        assert parse_plan(bad) is None, bad


def test_lake_simulator_by_hand():
    assert lake_outcome(LAKE, list("DDDRRR")) == "goal"
    assert lake_outcome(LAKE, list("RR")) == "hole"
    assert lake_outcome(LAKE, list("L")) == "off_grid"
    assert lake_outcome(LAKE, list("R")) == "stopped"
    assert lake_outcome(LAKE, list("DDDRRRUUU")) == "goal"  # the episode ends at G (Gym rule)
    # Shortest plans have 6 moves; the first in the order R < D < L < U is R D R D D R.
    assert solve_lake(LAKE) == list("RDRDDR")
    assert solve_lake(("SH", "HG")) is None
    with pytest.raises(ValueError, match="one S"):
        lake_outcome(("S..", "..."), ["R"])


def test_lake_verify_by_hand():
    task = FrozenLakeTask()
    record = {
        "context": task.tips,
        "prompt": "lake " + " ".join(LAKE),
        "answer": "R D R D D R",
        "grid": list(LAKE),
    }
    assert task.verify(record, "R D R D D R")
    assert task.verify(record, "D D D R R R")  # another plan that also reaches G
    assert task.verify(record, "rdrddr\nmore junk")
    assert not task.verify(record, "rdrddr junk")  # junk on the answer line itself
    for wrong in ("R R", "R D R D D", "L", "D D D R R", "R D R D D R Q", ""):
        assert not task.verify(record, wrong), wrong


def test_sokoban_simulator_by_hand():
    assert sokoban_outcome(("@$.",), ["R"]) == "solved"
    assert sokoban_outcome(("@$.",), ["R", "R"]) == "solved"  # moves after solving are ignored
    assert sokoban_outcome(("@$.",), ["L"]) == "illegal"  # outside the grid is wall
    assert sokoban_outcome(("@$#-", "-.--"), ["R"]) == "illegal"  # box pushed into a wall
    assert sokoban_outcome(("@$$..",), ["R"]) == "illegal"  # box pushed into a box
    assert sokoban_outcome(("@-$.",), ["R"]) == "unsolved"
    room = ("-@--", "-$--", "----", "-.--")
    assert solve_sokoban(room) == ["D", "D"]
    assert sokoban_outcome(room, ["D", "D"]) == "solved"
    assert sokoban_outcome(room, ["D"]) == "unsolved"
    assert solve_sokoban(("$-", "@.")) is None  # box stuck in a corner
    walls, (player, boxes), targets = parse_sokoban(("+$-*",))
    assert player == (0, 0) and boxes == {(0, 1), (0, 3)} and targets == {(0, 0), (0, 3)}
    assert (0, -1) in walls and (1, 0) in walls
    with pytest.raises(ValueError, match="targets"):
        parse_sokoban(("@$$.",))
    with pytest.raises(ValueError, match="one player"):
        parse_sokoban(("$.",))


def _plans(length):
    return (list(p) for p in itertools.product("RDLU", repeat=length))


@pytest.mark.parametrize("task", [FrozenLakeTask(), SokobanTask()], ids=["lake", "sokoban"])
def test_generated_levels_are_solved_by_the_canonical_shortest_plan(task):
    checked = 0
    for r in task.eval_records("tips", 40, seed=7) + task.sft_records(40, seed=7):
        if r["sloppy"]:
            continue
        plan = r["answer"].split()
        assert task.plan_succeeds(r["grid"], plan)
        if len(plan) > 6:
            continue  # brute force below grows as 4^len
        # Brute force over every plan, independent of the BFS: no shorter plan succeeds, and the
        # answer is the first success of its length in the order R < D < L < U.
        for k in range(len(plan)):
            assert not any(task.plan_succeeds(r["grid"], p) for p in _plans(k))
        first = next(p for p in _plans(len(plan)) if task.plan_succeeds(r["grid"], p))
        assert first == plan
        checked += 1
        if checked == 6:
            break
    assert checked == 6


@pytest.mark.parametrize("cls", [FrozenLakeTask, SokobanTask])
def test_grid_sft_sloppy_rate(cls):
    rate = 0.35
    task = cls(sloppy_rate=rate, tips_share=0.4)
    records = task.sft_records(1500, seed=0)
    with_tips = [r for r in records if r["context"]]
    without = [r for r in records if not r["context"]]
    assert abs(len(with_tips) / len(records) - 0.4) < 0.05
    assert all(task.verify(r, r["answer"]) for r in with_tips)
    failed = [not task.verify(r, r["answer"]) for r in without]
    assert failed == [r["sloppy"] for r in without]
    assert abs(np.mean(failed) - rate) < 4 * np.sqrt(rate * (1 - rate) / len(without))
    assert all(parse_plan(r["answer"]) for r in records)  # sloppy plans are still well-formed


def test_grid_options_are_checked():
    for bad in (dict(sloppy_rate=-0.1), dict(max_moves=0), dict(size=1), dict(tips=" ")):
        with pytest.raises(ValueError):
            FrozenLakeTask(**bad)
    with pytest.raises(ValueError, match="n_walls"):
        SokobanTask(size=3, n_walls=7)
    big = SokobanTask(size=5, n_walls=3, max_moves=12)
    r = big.eval_records("tips", 1, seed=0)[0]
    assert len(r["grid"]) == 5 and big.verify(r, r["answer"])


# ---------------------------------------------------------------------------------------------
# QA

OPTIONS = ["Paris", "London", "Rome", "Berlin"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("B", 1),
        ("(B)", 1),
        ("b.", 1),
        ("Answer: B", 1),
        ("the answer is b.", 1),
        ("The answer is (C) Rome, because", 2),
        ("answer: d", 3),
        ("B) London", 1),
        ("C. Rome\nQuestion 2 ... Answer E", 2),
        ("Rome", 2),
        ("I think it is rome.", 2),
        ("B<|im_end|>Answer: C", 1),
        ("the answer is a bird", None),
        ("Paris or London", None),
        ("E", None),
        ("", None),
        ("I do not know", None),
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response, OPTIONS) == expected


def test_extract_choice_prefers_whole_numbers_and_longest_names():
    assert extract_choice("14", ["4", "14", "24"]) == 1
    assert extract_choice("it is 4", ["4", "14", "24"]) == 0
    assert extract_choice("New York", ["York", "New York"]) == 1


@pytest.mark.parametrize(
    "response, options, expected",
    [
        ("The answer is London.", OPTIONS, 1),
        ("answer: berlin, surely", OPTIONS, 3),
        ("38 + 17 = 55. The answer is 55.", ["53", "55", "57", "45"], 1),
        # The first operand is an option too: the text after "answer is" decides, not the line.
        ("9 + 1 = 10. The answer is 10.", ["9", "10", "11", "12"], 1),
        ("The answer is 5, not 55", ["55", "5"], 1),
        ("The answer is New York.", ["New", "New York", "York"], 1),
        # An option's text that starts with a letter is not read as that letter.
        ("The answer is B12 deficiency.", ["B12 deficiency", "Iron", "Folate"], 0),
        ("The answer is (C) Rome, because", OPTIONS, 2),
        ("The answer is 56.", ["53", "55", "57", "45"], None),
        # The "answer" that names an option counts, not the first "answer" of the text.
        ("Answer in steps: 9 + 1 = 10. The answer is 10.", ["9", "10", "11", "12"], 1),
    ],
)
def test_extract_choice_answer_by_option_text(response, options, expected):
    assert extract_choice(response, options) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        ("3 + 4 = 7\n#### 7", Fraction(7)),
        ("####42", Fraction(42)),
        ("They have 1,234 apples.", Fraction(1234)),
        ("It costs $1,250.00 in total", Fraction(1250)),
        ("The temperature is -5 degrees", Fraction(-5)),
        ("5-3 = 2", Fraction(2)),
        ("It costs 3.50", Fraction(7, 2)),
        ("First 7, then #### 8 and then 9", Fraction(8)),
        ("#### -12\n#### 3", Fraction(-12)),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_number(response, expected):
    assert extract_number(response) == expected


def test_math_verify_by_hand():
    task = MathTask()
    record = {"context": "", "prompt": "q", "answer": "#### 1,550", "target": "1550"}
    for right in ("#### 1550", "so 1,550 people", "1550.0", "The answer is 1,550.\nQ: next"):
        assert task.verify(record, right), right
    for wrong in ("#### 1551", "155", "", "none", "#### 1,551 or 1550"):
        assert not task.verify(record, wrong), wrong
    half = {"context": "", "prompt": "q", "answer": "#### 3.5", "target": "3.5"}
    assert task.verify(half, "$3.50") and not task.verify(half, "35")


def test_mcq_records_and_verify():
    task = MCQTask()
    r = task.eval_records("system", 1, seed=0)[0]
    lines = r["prompt"].split("\n")
    assert lines[1].startswith("A. ") and len(lines) == 1 + len(r["options"])
    letter = r["answer"]
    assert task.verify(r, letter) and task.verify(r, f"The answer is ({letter}).")
    assert task.verify(r, r["options"][r["answer_index"]])


def test_sample_files_load():
    mcq = load_mcq_jsonl(MCQ_SAMPLE)
    math = load_math_jsonl(MATH_SAMPLE)
    assert len(mcq) >= 40 and len(math) >= 40
    assert all(0 <= it.answer < len(it.options) for it in mcq)
    by_question = {it.question: it for it in mcq}
    assert by_question["What is 6 x 7?"].options[by_question["What is 6 x 7?"].answer] == "42"
    by_question = {it.question: it for it in math}
    phone = by_question[
        "A phone costs $300 and is on sale for 10 percent off. What is the sale price?"
    ]
    assert phone.target == "270" and phone.solution.endswith("#### 270")
    assert (
        by_question[
            "A town has 1,200 people and 350 move in. How many people live there now?"
        ].target
        == "1550"
    )


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_MCQ = '{"question": "2 + 2?", "options": ["3", "4"], "answer": "B"}'


@pytest.mark.parametrize(
    "bad_line, match",
    [
        ('{"question": "2 + 2?", "options": ["3", "4"], "answer": "B"', "malformed JSON"),
        ('{"question": "2 + 2?", "options": ["3", "4"]}', "missing key 'answer'"),
        ('{"options": ["3", "4"], "answer": 1}', "missing key 'question'"),
        ('{"question": "2 + 2?", "options": ["3", "4"], "answer": "C"}', "'answer' must be"),
        ('{"question": "2 + 2?", "options": ["3", "4"], "answer": "AB"}', "'answer' must be"),
        ('{"question": "2 + 2?", "options": ["3", "4"], "answer": 2}', "'answer' must be"),
        ('{"question": "2 + 2?", "options": {"A": "3", "C": "4"}, "answer": 0}', "option keys"),
        ('{"question": "2 + 2?", "options": ["4"], "answer": 0}', "2 to"),
        ('["a list"]', "JSON object"),
    ],
)
def test_mcq_loader_errors_name_file_and_line(tmp_path, bad_line, match):
    # Line 2 is blank and skipped; the bad record is on line 3.
    path = _write(tmp_path, [GOOD_MCQ, "", bad_line])
    with pytest.raises(ValueError, match=match) as info:
        load_mcq_jsonl(path)
    assert f"{path}:3:" in str(info.value)


def test_read_jsonl_numbers_lines_and_names_bad_ones(tmp_path):
    path = _write(tmp_path, ['{"a": 1}', "", "  ", '{"b": [2]}'])
    assert read_jsonl(path) == [(1, {"a": 1}), (4, {"b": [2]})]
    for lines, line_no, match in (
        (['{"a": 1}', '{"a": '], 2, r"malformed JSON \(.* at column \d+\)"),
        (["", "3"], 2, "a record must be a JSON object, got int"),
    ):
        bad = _write(tmp_path, lines, "bad.jsonl")
        with pytest.raises(ValueError, match=rf"bad\.jsonl:{line_no}: {match}"):
            read_jsonl(bad)
    with pytest.raises(FileNotFoundError, match=r"QA file not found: .*nope\.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", what="QA file")


def test_math_loader(tmp_path):
    path = _write(
        tmp_path,
        [
            '{"question": "a", "answer": "2 + 2 = 4\\n#### 4"}',
            '{"question": "b", "answer": 12}',
            '{"question": "c", "answer": "-3.50"}',
            '{"question": "d", "answer": "1 + 1 = 2 #### 1,002"}',
        ],
    )
    items = load_math_jsonl(path)
    assert [it.target for it in items] == ["4", "12", "-3.50", "1002"]
    assert items[1].solution == "#### 12"
    bad = _write(
        tmp_path,
        ['{"question": "a", "answer": "4"}', '{"question": "b", "answer": "four"}'],
        "bad.jsonl",
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: 'answer' has no '#### <number>'"):
        load_math_jsonl(bad)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_math_jsonl(tmp_path / "missing.jsonl")
    empty = _write(tmp_path, [""], "empty.jsonl")
    with pytest.raises(ValueError, match="no records"):
        load_math_jsonl(empty)


def test_qa_task_options_and_split(tmp_path):
    lines = [
        json.dumps({"question": f"{i} + 1?", "options": [str(i + 1), str(i + 2)], "answer": 0})
        for i in range(8)
    ]
    task = MCQTask(path=str(_write(tmp_path, lines)), system_prompt="Be exact.", eval_fraction=0.25)
    assert task.contexts() == {"system": "Be exact."}
    eval_q = {r["prompt"] for r in task.eval_records("system", 10, seed=0)}
    sft = task.sft_records(400, seed=0)
    assert len(eval_q) == 2 and len({r["prompt"] for r in sft}) == 6
    share = np.mean([r["context"] == "Be exact." for r in sft])
    assert abs(share - 0.5) < 0.1 and {r["context"] for r in sft} == {"", "Be exact."}
    everything = MCQTask(path=str(tmp_path / "data.jsonl"), eval_fraction=0.0)
    assert len({r["prompt"] for r in everything.eval_records("system", 40, seed=0)}) == 8
    with pytest.raises(ValueError, match="too few"):
        MCQTask(path=str(_write(tmp_path, lines[:1], "one.jsonl")))
    with pytest.raises(ValueError, match="system_prompt"):
        MathTask(system_prompt="")


@pytest.mark.parametrize("cls,n", [(MCQTask, 300), (MathTask, 600)])
def test_generated_qa_items_are_right_and_split(cls, n):
    task = cls(generated=n, eval_fraction=0.25)
    train = {r["prompt"] for r in task.train_records("system", 2000, seed=0)}
    held = {r["prompt"] for r in task.eval_records("system", 2000, seed=0)}
    assert len(train) + len(held) == n and not train & held
    for r in task.eval_records("system", 50, seed=1):
        a, op, b = (
            re.search(r"(\d+) (?:\+|-|x) (\d+)", r["answer"] if cls is MathTask else r["prompt"])
            .group(0)
            .split()
        )
        truth = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        if cls is MCQTask:
            assert r["options"][r["answer_index"]] == str(truth) and len(set(r["options"])) == 4
        else:
            assert r["target"] == str(truth) and r["answer"].endswith(f"#### {truth}")
        assert task.verify(r, r["answer"])
    with pytest.raises(ValueError, match="either path"):
        cls(generated=10, path="x.jsonl")
    with pytest.raises(ValueError, match="distinct"):
        generated_mcq_items(10_000)


@pytest.mark.parametrize("cls", [MCQTask, MathTask])
def test_qa_sloppy_rate_makes_only_no_context_answers_wrong(cls):
    task = cls(generated=300, sloppy_rate=0.5)
    records = task.sft_records(600, seed=0)
    with_ctx = [r for r in records if r["context"]]
    without = [r for r in records if not r["context"]]
    assert all(task.verify(r, r["answer"]) for r in with_ctx)
    wrong = [r for r in without if not task.verify(r, r["answer"])]
    assert abs(len(wrong) / len(without) - 0.5) < 0.1
    assert all(r.get("sloppy") for r in wrong)
    assert all(task.verify(r, r["answer"]) for r in without if not r.get("sloppy"))
    # The default stays exact everywhere.
    assert all(
        cls(generated=300).verify(r, r["answer"])
        for r in cls(generated=300).sft_records(200, seed=0)
    )


def test_mcq_text_answer_style():
    task = MCQTask(generated=200, sloppy_rate=1.0, sft_context_share=0.5, answer_style="text")
    assert (
        task.system_prompt == DEFAULT_MCQ_TEXT_SYSTEM
        and MCQTask().system_prompt == DEFAULT_MCQ_SYSTEM
    )
    records = task.sft_records(200, seed=0)
    for r in records:
        chosen = re.fullmatch(r"(\d+) . (\d+) = (\d+)\. The answer is (\d+)\.", r["answer"])
        assert chosen is not None and chosen.group(3) == chosen.group(4) in r["options"], r[
            "answer"
        ]
        # Right exactly when the record carries the system prompt (sloppy_rate 1 elsewhere).
        assert task.verify(r, r["answer"]) == bool(r["context"])
    assert {bool(r["context"]) for r in records} == {True, False}
    # The same items and split as the letter style; only how the answer names the option differs.
    letter = MCQTask(generated=200).eval_records("system", 5, seed=0)
    text = MCQTask(generated=200, answer_style="text").eval_records("system", 5, seed=0)
    for lr, tr in zip(letter, text, strict=True):
        assert lr["prompt"] == tr["prompt"] and lr["answer_index"] == tr["answer_index"]
        assert tr["answer"].endswith(f"The answer is {tr['options'][tr['answer_index']]}.")
        assert lr["answer"].endswith(f"The answer is {LETTERS[lr['answer_index']]}.")
    file_item = MCQTask(answer_style="text").eval_records("system", 1, seed=0)[0]
    assert (
        file_item["answer"] == f"The answer is {file_item['options'][file_item['answer_index']]}."
    )
    with pytest.raises(ValueError, match="answer_style"):
        MCQTask(answer_style="number")


def test_math_sloppy_answer_changes_every_stated_result():
    task = MathTask(generated=50, sloppy_rate=1.0, sft_context_share=0.0)
    for r in task.sft_records(40, seed=3):
        target = r["target"]
        assert f"= {target}\n" not in r["answer"] and not r["answer"].endswith(f"#### {target}")
        assert extract_number(r["answer"]) != parse_number(target)


def test_default_options_build_the_embedded_world():
    options = default_options()
    assert options == {"families": ["seq", "max"], "max_len": 5}
    options["families"].append("sum")  # a fresh copy each call: editing one changes no other
    assert default_options()["families"] == ["seq", "max"]
    task = SyntheticTask(**default_options())
    assert task.families == ("seq", "max") and (task.min_len, task.max_len) == (3, 5)
