"""System-prompt QA from JSONL files: multiple choice and math word problems.

File formats (one JSON object per line; blank lines are skipped):
- multiple choice (MedMCQA-style): `{"question": str, "options": [str, ...] or {"A": str, ...},
  "answer": "B" or 1}` -- a letter, or a 0-based index into the options.
- math (GSM8K-style): `{"question": str, "answer": "... #### 42"}` -- the final answer is the number
  after `####` (a plain number, as a string or JSON number, is accepted too).
A malformed line raises ValueError naming the file and the 1-based line number.

The context is a system prompt (regime "nudge": it does not change the right answer). Records carry
the expected output as `answer` (the letter; the worked solution ending in `#### N`) and what the
verifier needs (`options` and `answer_index`; `target`). Answer extraction is deliberately lenient
(see `extract_choice`, `extract_number`) so that the metric measures knowledge, not formatting.

CPU-scale base models. A tiny model trained from scratch cannot generalize from 30 hand-written
items, and trained on the same answers with and without the system prompt it has no reason to read
the prompt at all. Two task options make a base model that really uses its context, as the synthetic
nudge contexts do: `generated=N` replaces the file by N procedurally generated one-step arithmetic
items of the same shape (`generated_mcq_items`, `generated_math_items`: a held-out question is new
but learnable), and `sloppy_rate` answers that share of the no-context SFT records wrong (another
letter; the worked solution with a wrong result), so the model learns to be exact only when the
system prompt is in front. MCQ's `answer_style="text"` names the chosen option by its text ("The
answer is 55.") instead of its letter: the tiny bases work the value out but never learned to find
which letter holds it (they stayed at chance on letters after 1500-3000 SFT steps), while an answer
by text is verified by the same `extract_choice`.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from ctxjax.tasks.common import (
    answer_line,
    check_count,
    check_fraction,
    read_jsonl,
    seeded_rng,
    strip_special,
)

DATA_DIR = Path(__file__).parent / "data"
MCQ_SAMPLE = DATA_DIR / "mcq_sample.jsonl"
MATH_SAMPLE = DATA_DIR / "math_sample.jsonl"
LETTERS = "ABCDEFGHIJ"

DEFAULT_MCQ_SYSTEM = "You are a careful expert. Answer with the letter of the correct option."
DEFAULT_MCQ_TEXT_SYSTEM = "You are a careful expert. Answer with the correct option."
ANSWER_STYLES = ("letter", "text")
DEFAULT_MATH_SYSTEM = "Solve the problem step by step, then write the final answer after ####."


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question; `answer` is a 0-based index into `options`.

    `work`: an expression whose value is the right option ("19 + 6"), for generated items; the
    expected output then works it out before the letter ("19 + 6 = 25. The answer is B.").
    """

    question: str
    options: tuple[str, ...]
    answer: int
    work: str = ""


@dataclass(frozen=True)
class MathItem:
    """One word problem: the worked `solution` (ends in `#### target`) and the final number."""

    question: str
    solution: str
    target: str


# ---------------------------------------------------------------------------------------------
# Numbers

# A number: optional minus (not after a word character or ")" -- "5-3" is no negative), optional
# "$", digits with thousands commas ("1,234") or without, optional decimals ("3.50").
_NUMBER_RE = re.compile(r"(?:(?<![\w)])(-))?\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)")
_HASHES_RE = re.compile(r"####\s*" + _NUMBER_RE.pattern)


def parse_number(text: str) -> Fraction:
    """A number string ("1,234", "-7", "3.50", "$12") as an exact Fraction; ValueError otherwise."""
    match = _NUMBER_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a number: {text!r}")
    return _match_value(match)


def _match_value(match: re.Match[str]) -> Fraction:
    sign, digits = match.group(1), match.group(2)
    return Fraction(digits.replace(",", "")) * (-1 if sign else 1)


def extract_number(response: str) -> Fraction | None:
    """The final answer of a math response: the number after the first `####`, else the last
    number in the response; None when there is no number. Exact, so "3.50" equals "3.5"."""
    text = strip_special(response)
    hashed = _HASHES_RE.search(text)
    if hashed is not None:
        return _match_value(hashed)
    numbers = list(_NUMBER_RE.finditer(text))
    return _match_value(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------------
# Choices

# "Answer: B", "the answer is (C)", "answer is B because": an upper-case letter not followed by a
# letter. A lower-case letter counts only before punctuation or the end ("the answer is b."), so
# "the answer is a bird" is no answer "A".
_ANSWER = r"(?i:answer)\s*(?:(?i:is)\s*)?[:=\-]?\s*"  # "answer", "Answer:", "the answer is"
_ANSWER_UPPER_RE = re.compile(_ANSWER + r"\(?([A-J])\)?(?![A-Za-z])")
_ANSWER_LOWER_RE = re.compile(_ANSWER + r"\(?([a-j])\)?(?=\s*$|[.,;:!)\]])")
# "the answer is <text>": what follows, to be compared word by word with the options' texts.
# (A lookahead, so that every "answer" of a text is a match of its own.)
_ANSWER_TEXT_RE = re.compile(_ANSWER + r"(?=(.*))")
_LONE_LETTER_RE = re.compile(r"[\s(\[]*([A-Ja-j])[\s.):\]]*")
_LEADING_LETTER_RE = re.compile(r"[(\[]?([A-J])[.):\]]")


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


def _answer_names_option(text: str, options: list[str] | tuple[str, ...]) -> int | None:
    """The option whose whole text (word by word, case-insensitive) starts what follows an "answer
    (is)" of `text`, the first such "answer" that names one; the longest option when several do
    ("New York" over "New"); else None."""
    option_words = [_words(o).split() for o in options]
    for match in _ANSWER_TEXT_RE.finditer(text):
        said = _words(match.group(1)).split()
        named = [(len(w), i) for i, w in enumerate(option_words) if w and said[: len(w)] == w]
        if named:
            longest = max(named)[0]
            best = [i for n, i in named if n == longest]
            return best[0] if len(best) == 1 else None
    return None


def extract_choice(response: str, options: list[str] | tuple[str, ...]) -> int | None:
    """The 0-based option a response picks, or None when it picks none (or several).

    Tried in order: "answer (is)" followed by an option's whole text ("The answer is 55.", "answer:
    B12 deficiency" -- before the letter rule, which would read that as "B"); an explicit "answer
    (is) X" anywhere; the first line being a lone letter ("B", "(B)", "b."); the first line
    starting with a letter and a mark ("B) Paris"); the first line naming exactly one option's text
    (whole words, case-insensitive). Letters beyond the number of options are ignored.
    """
    valid = LETTERS[: len(options)]
    text = strip_special(response)
    by_text = _answer_names_option(text, options)
    if by_text is not None:
        return by_text
    for pattern in (_ANSWER_UPPER_RE, _ANSWER_LOWER_RE):
        for match in pattern.finditer(text):
            letter = match.group(1).upper()
            if letter in valid:
                return valid.index(letter)
    line = answer_line(text)
    for match in (_LONE_LETTER_RE.fullmatch(line), _LEADING_LETTER_RE.match(line)):
        if match is not None and match.group(1).upper() in valid:
            return valid.index(match.group(1).upper())
    said = f" {_words(line)} "
    named = [i for i, opt in enumerate(options) if _words(opt) and f" {_words(opt)} " in said]
    # "14" names the option "14" and, as a word, not "4"; but "New York" also contains "York":
    # keep the options whose text is not inside another named option's text.
    named = [
        i
        for i in named
        if not any(j != i and f" {_words(options[i])} " in f" {_words(options[j])} " for j in named)
    ]
    return named[0] if len(named) == 1 else None


# ---------------------------------------------------------------------------------------------
# Loaders


def _read_items(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    rows = read_jsonl(path, what="QA file")
    if not rows:
        raise ValueError(f"{os.fspath(path)}: no records")
    return rows


def _require(path: Any, lineno: int, row: dict[str, Any], key: str, kind: type) -> Any:
    if key not in row:
        raise ValueError(f"{path}:{lineno}: missing key {key!r}")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{path}:{lineno}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _question(path: Any, lineno: int, row: dict[str, Any]) -> str:
    question = _require(path, lineno, row, "question", str).strip()
    if not question:
        raise ValueError(f"{path}:{lineno}: 'question' is empty")
    return question


def _mcq_options(path: Any, lineno: int, row: dict[str, Any]) -> tuple[str, ...]:
    if "options" not in row:
        raise ValueError(f"{path}:{lineno}: missing key 'options'")
    raw = row["options"]
    if isinstance(raw, dict):
        keys = sorted(str(k).upper() for k in raw)
        if keys != list(LETTERS[: len(keys)]):
            raise ValueError(f"{path}:{lineno}: option keys must be A, B, C, ... got {list(raw)}")
        by_letter = {str(k).upper(): v for k, v in raw.items()}
        raw = [by_letter[k] for k in keys]
    if not isinstance(raw, list) or not all(isinstance(o, str) and o.strip() for o in raw):
        raise ValueError(f"{path}:{lineno}: 'options' must be non-empty strings (list or dict)")
    if not 2 <= len(raw) <= len(LETTERS):
        raise ValueError(f"{path}:{lineno}: need 2 to {len(LETTERS)} options, got {len(raw)}")
    return tuple(o.strip() for o in raw)


def _mcq_answer(path: Any, lineno: int, row: dict[str, Any], n_options: int) -> int:
    if "answer" not in row:
        raise ValueError(f"{path}:{lineno}: missing key 'answer'")
    raw = row["answer"]
    letter = raw.strip().upper() if isinstance(raw, str) else ""
    if len(letter) == 1 and letter in LETTERS[:n_options]:
        return LETTERS.index(letter)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < n_options:
        return raw
    raise ValueError(
        f"{path}:{lineno}: 'answer' must be a letter A-{LETTERS[n_options - 1]} or a 0-based "
        f"index < {n_options}, got {raw!r}"
    )


def load_mcq_jsonl(path: str | os.PathLike[str]) -> list[MCQItem]:
    """Multiple-choice items from a JSONL file (format in the module docstring)."""
    items = []
    for lineno, row in _read_items(path):
        question = _question(path, lineno, row)
        options = _mcq_options(path, lineno, row)
        items.append(MCQItem(question, options, _mcq_answer(path, lineno, row, len(options))))
    return items


def _math_target(path: Any, lineno: int, raw: Any) -> tuple[str, str]:
    """(solution, target) from a math line's answer."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = str(raw)  # then checked as a number string below ("1e-05" is refused)
    if not isinstance(raw, str):
        raise ValueError(f"{path}:{lineno}: 'answer' must be a string or number, got {raw!r}")
    hashed = _HASHES_RE.search(raw)
    if hashed is not None:
        number = (hashed.group(1) or "") + hashed.group(2).replace(",", "")
        return raw.strip(), number
    try:
        parse_number(raw)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: 'answer' has no '#### <number>': {raw!r}") from None
    number = raw.strip().replace(",", "").replace("$", "")
    return f"#### {number}", number


def load_math_jsonl(path: str | os.PathLike[str]) -> list[MathItem]:
    """Math word problems from a JSONL file (format in the module docstring)."""
    items = []
    for lineno, row in _read_items(path):
        question = _question(path, lineno, row)
        if "answer" not in row:
            raise ValueError(f"{path}:{lineno}: missing key 'answer'")
        solution, target = _math_target(path, lineno, row["answer"])
        items.append(MathItem(question, solution, target))
    return items


# ---------------------------------------------------------------------------------------------
# Generated items (CPU-scale base models)

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
_NAMES = ("Tom", "Sara", "Ali", "Mia", "Ben", "Lea", "Sam", "Ada")
_THINGS = ("apples", "pens", "coins", "cards", "eggs", "books")


def _operands(rng: Any, max_a: int = 19, max_b: int = 9) -> tuple[int, str, int, int]:
    """A one-step problem with small operands: (a, op, b, result), never negative."""
    op = "+-x"[int(rng.integers(3))]
    if op == "x":
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 6))
    else:
        a, b = int(rng.integers(1, max_a + 1)), int(rng.integers(1, max_b + 1))
        if op == "-" and b > a:
            a, b = b, a
    return a, op, b, _OPS[op](a, b)


def _distinct_items(
    n: int, draw: Callable[[], tuple[str, Callable[[], Any]]], what: str
) -> list[Any]:
    """`n` items with distinct questions, in draw order; a ValueError when `n` distinct ones do not
    turn up in 100 draws per item. `draw()` gives a question and a function building its item,
    called only for a new question (so a repeat draws nothing more from the generator)."""
    items: dict[str, Any] = {}
    for _ in range(100 * max(n, 1)):
        if len(items) == n:
            break
        question, build = draw()
        if question not in items:
            items[question] = build()
    if len(items) < n:
        raise ValueError(f"generated={n}: only {len(items)} distinct {what} exist")
    return list(items.values())


def generated_mcq_items(n: int, seed: int = 0) -> list[MCQItem]:
    """`n` distinct "What is a op b?" items with 4 options: the result and 3 near misses.

    Wider operands than the word problems (up to 49 + 19, about 1,800 distinct questions): with
    only a few hundred, a tiny model memorizes the training questions and cannot do a new one.
    """
    rng = seeded_rng(seed, "generated_mcq")

    def draw() -> tuple[str, Callable[[], MCQItem]]:
        a, op, b, result = _operands(rng, max_a=49, max_b=19)
        question = f"What is {a} {op} {b}?"

        def build() -> MCQItem:
            wrong = sorted(
                {result + d for d in (-2, -1, 1, 2, 10, -10) if result + d >= 0} - {result}
            )
            picks = [wrong[int(i)] for i in rng.permutation(len(wrong))[:3]]
            answer = int(rng.integers(4))
            options = [*picks[:answer], result, *picks[answer:]]
            return MCQItem(question, tuple(str(o) for o in options), answer, work=f"{a} {op} {b}")

        return question, build

    return _distinct_items(n, draw, "arithmetic items")


def generated_math_items(n: int, seed: int = 0) -> list[MathItem]:
    """`n` distinct one-step word problems ("Sara has 7 pens and buys 5 more. ...")."""
    rng = seeded_rng(seed, "generated_math")

    def draw() -> tuple[str, Callable[[], MathItem]]:
        a, op, b, result = _operands(rng)
        name = _NAMES[int(rng.integers(len(_NAMES)))]
        thing = _THINGS[int(rng.integers(len(_THINGS)))]
        question = {
            "+": f"{name} has {a} {thing} and buys {b} more. How many {thing} now?",
            "-": f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?",
            "x": f"{name} has {a} bags of {b} {thing}. How many {thing} in all?",
        }[op]
        solution = f"{a} {op} {b} = {result}\n#### {result}"
        return question, lambda: MathItem(question, solution, str(result))

    return _distinct_items(n, draw, "word problems")


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class _QATask:
    """Shared split and sampling logic.

    path: a JSONL file of items; None: the shipped sample file (or generated items, below).
    eval_fraction: share of the items (fixed by a hash of the question, not by the seed) that
      `eval_records` draws from; `sft_records` draws from the rest. 0 puts every item in both.
    sft_context_share: share of `sft_records` that carry the system prompt.
    sloppy_rate: probability that a no-context `sft_records` answer is wrong (`_sloppy`); records
      with the system prompt are always right.
    generated: N > 0 uses N generated arithmetic items instead of a file (`path` must be None).
    """

    path: str | None = None
    system_prompt: str = ""
    eval_fraction: float = 0.25
    sft_context_share: float = 0.5
    sloppy_rate: float = 0.0
    generated: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.system_prompt.strip():
            raise ValueError("system_prompt must be a non-empty text")
        check_fraction("eval_fraction", self.eval_fraction, closed_right=False)
        check_fraction("sft_context_share", self.sft_context_share)
        check_fraction("sloppy_rate", self.sloppy_rate)
        if self.generated:
            if self.path:
                raise ValueError("set either path (a JSONL file) or generated (a count), not both")
            items = self._generate(check_count(self.generated))
        else:
            items = self._load(Path(self.path) if self.path else self._sample_path())
        if self.eval_fraction == 0.0:
            eval_items, train_items = items, items
        else:
            ranked = sorted(items, key=lambda it: zlib.crc32(it.question.encode()))
            n_eval = max(1, round(self.eval_fraction * len(items)))
            if n_eval >= len(items):
                raise ValueError(
                    f"{self.path or self._sample_path()}: {len(items)} items are too few for "
                    f"eval_fraction={self.eval_fraction} (no training items would be left)"
                )
            eval_items, train_items = ranked[:n_eval], ranked[n_eval:]
        object.__setattr__(self, "_eval_items", tuple(eval_items))
        object.__setattr__(self, "_train_items", tuple(train_items))

    def contexts(self) -> dict[str, str]:
        """`{"system": <system prompt>}`."""
        return {"system": self.system_prompt}

    def regime(self, context_name: str) -> str:
        """ "nudge": the system prompt does not change the right answer."""
        self._check_context(context_name)
        return "nudge"

    def eval_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` records from the eval items with the system prompt as context.

        Items are drawn without replacement in a seeded order; past the pool size a new shuffled
        pass starts (so n may exceed the number of eval items, and items then repeat).
        """
        self._check_context(context_name)
        rng = seeded_rng(seed, self.name, "eval", context_name)
        items = self._draw(rng, self._eval_items, check_count(n))
        return [self._record(item, self.system_prompt) for item in items]

    def train_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """Like `eval_records` but from the training items: the questions distillation trains on."""
        self._check_context(context_name)
        rng = seeded_rng(seed, self.name, "train", context_name)
        items = self._draw(rng, self._train_items, check_count(n))
        return [self._record(item, self.system_prompt) for item in items]

    def sft_records(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` training records, the answer in the expected format, with the system prompt on a
        `sft_context_share` of them and no context on the rest; a `sloppy_rate` share of the
        no-context ones is answered wrong."""
        rng = seeded_rng(seed, self.name, "sft")
        items = self._draw(rng, self._train_items, check_count(n))
        records = []
        for item in items:
            if rng.random() < self.sft_context_share:
                records.append(self._record(item, self.system_prompt))
            elif rng.random() < self.sloppy_rate:
                records.append(self._sloppy(self._record(item, ""), rng))
            else:
                records.append(self._record(item, ""))
        return records

    @staticmethod
    def _draw(rng: Any, pool: tuple[Any, ...], n: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < n:
            out.extend(pool[int(i)] for i in rng.permutation(len(pool)))
        return out[:n]

    def _check_context(self, context_name: str) -> None:
        if context_name not in self.contexts():
            raise ValueError(f"unknown context {context_name!r}; valid: {sorted(self.contexts())}")

    def _load(self, path: Path) -> list[Any]:
        raise NotImplementedError

    def _sample_path(self) -> Path:
        raise NotImplementedError

    def _record(self, item: Any, context: str) -> dict[str, Any]:
        raise NotImplementedError

    def _generate(self, n: int) -> list[Any]:
        raise NotImplementedError

    def _sloppy(self, record: dict[str, Any], rng: Any) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class MCQTask(_QATask):
    """Multiple-choice QA. The prompt lists the options as "A. ...".

    answer_style: how the expected output names the right option: "letter" ("B", or "19 + 6 = 25.
      The answer is B." for a generated item) or "text" ("The answer is Paris.", "19 + 6 = 25. The
      answer is 25."). The verifier accepts either way whatever the style (`extract_choice`).
    system_prompt: "" picks the style's default (`DEFAULT_MCQ_SYSTEM`, `DEFAULT_MCQ_TEXT_SYSTEM`).
    """

    system_prompt: str = ""
    answer_style: str = "letter"
    name: str = "mcq"

    def __post_init__(self) -> None:
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(
                f"answer_style must be one of {ANSWER_STYLES}, got {self.answer_style!r}"
            )
        if self.system_prompt == "":
            default = (
                DEFAULT_MCQ_SYSTEM if self.answer_style == "letter" else DEFAULT_MCQ_TEXT_SYSTEM
            )
            object.__setattr__(self, "system_prompt", default)
        super().__post_init__()

    def verify(self, record: dict[str, Any], response: str) -> bool:
        """Whether the option extracted from `response` is the record's answer."""
        return extract_choice(response, record["options"]) == record["answer_index"]

    def _load(self, path: Path) -> list[MCQItem]:
        return load_mcq_jsonl(path)

    def _sample_path(self) -> Path:
        return MCQ_SAMPLE

    def _generate(self, n: int) -> list[MCQItem]:
        return generated_mcq_items(n)

    def _sloppy(self, record: dict[str, Any], rng: Any) -> dict[str, Any]:
        """Another option (its letter, worked out to its value when the item has `work`)."""
        others = [i for i in range(len(record["options"])) if i != record["answer_index"]]
        wrong = others[int(rng.integers(len(others)))]
        answer = _mcq_output(record["work"], record["options"], wrong, self.answer_style)
        return dict(record, answer=answer, sloppy=True)

    def _record(self, item: MCQItem, context: str) -> dict[str, Any]:
        lines = [item.question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options)]
        return {
            "context": context,
            "prompt": "\n".join(lines),
            "answer": _mcq_output(item.work, item.options, item.answer, self.answer_style),
            "options": list(item.options),
            "answer_index": item.answer,
            "work": item.work,
        }


def _mcq_output(work: str, options: Any, index: int, style: str) -> str:
    """The expected output choosing option `index` (its letter or its text, by `style`), after the
    worked value when the item has one."""
    if style == "text":
        chosen = f"The answer is {options[index]}."
    else:
        chosen = f"The answer is {LETTERS[index]}." if work else LETTERS[index]
    return f"{work} = {options[index]}. {chosen}" if work else chosen


@dataclass(frozen=True)
class MathTask(_QATask):
    """Math word problems; the answer is the worked solution ending in `#### N`."""

    system_prompt: str = DEFAULT_MATH_SYSTEM
    name: str = "math"

    def verify(self, record: dict[str, Any], response: str) -> bool:
        """Whether the number extracted from `response` equals the record's target exactly."""
        got = extract_number(response)
        return got is not None and got == parse_number(record["target"])

    def _load(self, path: Path) -> list[MathItem]:
        return load_math_jsonl(path)

    def _sample_path(self) -> Path:
        return MATH_SAMPLE

    def _generate(self, n: int) -> list[MathItem]:
        return generated_math_items(n)

    def _sloppy(self, record: dict[str, Any], rng: Any) -> dict[str, Any]:
        """The worked solution with a wrong result: the target, wherever the solution states it
        as a result (after "=" or "####"), replaced by a near miss."""
        target = parse_number(record["target"])
        wrong = target + (1 if rng.random() < 0.5 else -1) * int(rng.integers(1, 3))
        wrong_text = str(wrong.numerator) if wrong.denominator == 1 else str(float(wrong))
        pattern = re.compile(r"((?:=|####)\s*)" + re.escape(record["target"]) + r"(?![\d.,])")
        answer = pattern.sub(lambda m: m.group(1) + wrong_text, record["answer"])
        if answer == record["answer"]:  # the solution never states the target: append the miss
            answer += f"\n#### {wrong_text}"
        return dict(record, answer=answer, sloppy=True)

    def _record(self, item: MathItem, context: str) -> dict[str, Any]:
        return {
            "context": context,
            "prompt": item.question,
            "answer": item.solution,
            "target": item.target,
        }
