"""Verifiers for a user's records: whether a decoded response is right, from a small spec.

A spec is one of:
- a type name as a string: `"exact"`, `"normalized"`, `"number"`, `"choice"`, `"regex"`;
- a `"module:function"` string: the user's `fn(record, response) -> bool`, which must return a
  real `bool` (`True`/`False`, numpy's bool too): no partial credit, since Acc and Harm count
  right and wrong answers. Anything else (`'False'`, `1`, `None`) is a `VerifierError` naming the
  verifier, the record (file and line) and the value, and so is an exception it raises;
- a mapping `{"type": <name>, ...parameters}`, e.g. `{"type": "max_words", "n": 20}`;
- a non-empty list of those: every one must hold.

Types (the response is cut at the first special-token marker and stripped before any check):
- `exact` (reads `answer`): the response equals the answer, both stripped.
- `normalized` (reads `answer`): equal after lower-casing, deleting punctuation and collapsing
  whitespace (`normalize`).
- `number` (reads `answer`, its final number): the response's final number (after `####`, else
  the last one) equals it exactly, as fractions: "1,000" == "1000", "3.50" == "3.5".
- `choice` (reads `options`, 2-10 strings, and `answer`, a letter or one option's text): the
  option the response picks, by letter or by text (`qa.extract_choice`), is the answer.
- `regex`, parameters `pattern` (absent: the record's `answer` is the pattern) and `mode`:
  `"search"` (the default: it matches somewhere in the response) or `"fullmatch"` (it matches the
  whole response).
- `ends_with`, parameter `text`: the response ends with `text` (stripped).
- `max_words`, parameter `n`: at most `n` whitespace-separated words.
- `max_sentences`, parameter `n`: at most `n` sentences (`count_sentences`: a sentence ends at
  `.`, `!` or `?` followed by whitespace, or at the end of the response).
- `contains`, parameter `text` (a string or a list of strings): every string occurs (case matters).
- `not_contains`, parameter `text` (the same): none of them occurs.
- `python`, parameter `fn` (`"module:function"`, importable where the evaluation runs):
  `fn(record, response)` is true, given the cleaned response; it reads what it needs from the
  record.

The rule types (`ends_with` to `not_contains`) need no `answer`, so a style or format system prompt
has a measurable success rate. A spec is compiled once (`compile_verifier`) and each record is
checked against it (`Verifier.check`) at load time, so a missing field or an unimportable function
fails before an evaluation starts, with the record's file and line.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import string
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from ctxjax.tasks.common import strip_special
from ctxjax.tasks.qa import LETTERS, extract_choice, extract_number

Record = dict[str, Any]

REGEX_MODES = ("search", "fullmatch")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
# Sentences end at `.`, `!` or `?` followed by whitespace: "3.5" and "e.g.," do not end one.
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")


class VerifierError(ValueError):
    """A user's verifier failed on a record (raised, or returned a non-bool); one line naming the
    verifier and the record."""


def clean(response: str) -> str:
    """What every verifier reads: the response cut at the first special-token marker, stripped."""
    return strip_special(response).strip()


def normalize(text: str) -> str:
    """Lower case, punctuation deleted, whitespace collapsed: "Hello,  World!" -> "hello world"."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def count_sentences(text: str) -> int:
    """Pieces of text with a word character between sentence ends (`.`, `!` or `?` followed by
    whitespace) and the end of the text: "It is 3.5. Bye" -> 2."""
    return sum(1 for piece in _SENTENCE_END_RE.split(text) if re.search(r"\w", piece))


def _answer(record: Record) -> str:
    answer = record.get("answer")
    if not isinstance(answer, str):
        raise ValueError("needs the record's 'answer' (a string)")
    return answer


def _choice_index(record: Record) -> int:
    """The 0-based right option: the answer is a letter ("B") or an option's text (any case)."""
    options = record.get("options")
    if (
        not isinstance(options, list)
        or not 2 <= len(options) <= len(LETTERS)
        or not all(isinstance(o, str) and o.strip() for o in options)
    ):
        raise ValueError(f"needs the record's 'options': a list of 2 to {len(LETTERS)} strings")
    answer = _answer(record).strip()
    if len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
        return LETTERS.index(answer.upper())
    by_text = [i for i, o in enumerate(options) if o.strip().lower() == answer.lower()]
    if len(by_text) != 1:
        raise ValueError(
            f"'answer' {answer!r} is neither a letter A-{LETTERS[len(options) - 1]} nor the "
            "text of exactly one option"
        )
    return by_text[0]


def _target_number(record: Record) -> Any:
    target = extract_number(_answer(record))
    if target is None:
        raise ValueError(f"'answer' {record['answer']!r} holds no number")
    return target


def _strings(value: Any, key: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, (list, tuple))
        or not items
        or not all(isinstance(s, str) and s for s in items)
    ):
        raise ValueError(f"{key!r} must be a non-empty string or list of them, got {value!r}")
    return tuple(items)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key!r} must be an int >= 1, got {value!r}")
    return value


def import_function(name: str) -> Callable[[Record, str], bool]:
    """The callable named `"module:function"` (`function` may be dotted: `"mod:Class.method"`)."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"a python verifier is 'module:function', got {name!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {name!r} ({e})") from None
    if not callable(obj):
        raise ValueError(f"verifier {name!r} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------
# Compiled verifiers


class Verifier(Protocol):
    """A compiled spec (`compile_verifier`)."""

    def check(self, record: Record) -> None:
        """ValueError (no location: the caller adds it) when the record lacks what it reads."""
        ...

    def __call__(self, record: Record, text: str) -> bool:
        """Whether an already cleaned response (`clean`) is right for the record."""
        ...


@dataclasses.dataclass(frozen=True)
class Exact:
    def check(self, record: Record) -> None:
        _answer(record)

    def __call__(self, record: Record, text: str) -> bool:
        return text == record["answer"].strip()


@dataclasses.dataclass(frozen=True)
class Normalized:
    def check(self, record: Record) -> None:
        _answer(record)

    def __call__(self, record: Record, text: str) -> bool:
        return normalize(text) == normalize(record["answer"])


@dataclasses.dataclass(frozen=True)
class Number:
    def check(self, record: Record) -> None:
        _target_number(record)

    def __call__(self, record: Record, text: str) -> bool:
        got = extract_number(text)
        return got is not None and got == _target_number(record)


@dataclasses.dataclass(frozen=True)
class Choice:
    def check(self, record: Record) -> None:
        _choice_index(record)

    def __call__(self, record: Record, text: str) -> bool:
        return extract_choice(text, record["options"]) == _choice_index(record)


@dataclasses.dataclass(frozen=True)
class Regex:
    pattern: str | None  # None: the record's answer is the pattern
    mode: str = "search"

    def check(self, record: Record) -> None:
        if self.pattern is None:
            try:
                re.compile(_answer(record))
            except re.error as e:
                raise ValueError(f"'answer' is not a valid regex ({e})") from None

    def __call__(self, record: Record, text: str) -> bool:
        pattern = record["answer"] if self.pattern is None else self.pattern
        match = re.fullmatch if self.mode == "fullmatch" else re.search
        return match(pattern, text) is not None


@dataclasses.dataclass(frozen=True)
class EndsWith:
    text: str

    def check(self, record: Record) -> None:
        pass

    def __call__(self, record: Record, text: str) -> bool:
        return text.endswith(self.text.strip())


@dataclasses.dataclass(frozen=True)
class MaxWords:
    n: int

    def check(self, record: Record) -> None:
        pass

    def __call__(self, record: Record, text: str) -> bool:
        return len(text.split()) <= self.n


@dataclasses.dataclass(frozen=True)
class MaxSentences:
    n: int

    def check(self, record: Record) -> None:
        pass

    def __call__(self, record: Record, text: str) -> bool:
        return count_sentences(text) <= self.n


@dataclasses.dataclass(frozen=True)
class Contains:
    texts: tuple[str, ...]
    negate: bool = False  # not_contains: none of `texts` may occur

    def check(self, record: Record) -> None:
        pass

    def __call__(self, record: Record, text: str) -> bool:
        if self.negate:
            return not any(t in text for t in self.texts)
        return all(t in text for t in self.texts)


@dataclasses.dataclass(frozen=True)
class Python:
    name: str  # "module:function", kept for messages
    fn: Callable[[Record, str], bool]

    def check(self, record: Record) -> None:
        pass

    def __call__(self, record: Record, text: str) -> bool:
        where = record.get("_source", "a record")
        try:
            result = self.fn(record, text)
        except Exception as e:
            message = " ".join(str(e).split())[:200]
            raise VerifierError(
                f"{where}: verifier {self.name!r} raised {type(e).__name__}: {message}"
            ) from e
        # bool(...) would pass the string 'False' and every non-empty value: only a bool counts.
        if not isinstance(result, (bool, np.bool_)):
            raise VerifierError(
                f"{where}: verifier {self.name!r} returned {result!r} "
                f"({type(result).__name__}) for the response {text[:60]!r}: a verifier must "
                f"return True or False"
            )
        return bool(result)


@dataclasses.dataclass(frozen=True)
class AllOf:
    """A list spec: every part must hold."""

    parts: tuple[Verifier, ...]

    def check(self, record: Record) -> None:
        for part in self.parts:
            part.check(record)

    def __call__(self, record: Record, text: str) -> bool:
        return all(part(record, text) for part in self.parts)


# type name -> (parameters it takes, builder from the checked parameter dict)
_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], Verifier]]] = {
    "exact": ((), lambda p: Exact()),
    "normalized": ((), lambda p: Normalized()),
    "number": ((), lambda p: Number()),
    "choice": ((), lambda p: Choice()),
    "regex": (("pattern", "mode"), lambda p: _regex(p)),
    "ends_with": (("text",), lambda p: EndsWith(_text(p.get("text"), "text"))),
    "max_words": (("n",), lambda p: MaxWords(_count(p.get("n"), "n"))),
    "max_sentences": (("n",), lambda p: MaxSentences(_count(p.get("n"), "n"))),
    "contains": (("text",), lambda p: Contains(_strings(p.get("text"), "text"))),
    "not_contains": (("text",), lambda p: Contains(_strings(p.get("text"), "text"), True)),
    "python": (("fn",), lambda p: _python(p.get("fn"))),
}
VERIFIER_TYPES = tuple(_BUILDERS)


def _regex(params: dict[str, Any]) -> Regex:
    mode = params.get("mode", "search")
    if mode not in REGEX_MODES:
        raise ValueError(f"regex 'mode' must be one of {list(REGEX_MODES)}, got {mode!r}")
    pattern = params.get("pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ValueError(f"regex 'pattern' must be a string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"regex 'pattern' {pattern!r} is invalid ({e})") from None
    return Regex(pattern, mode)


def _python(name: Any) -> Python:
    if not isinstance(name, str):
        raise ValueError(f"python verifier 'fn' must be a 'module:function' string, got {name!r}")
    return Python(name, import_function(name))


def compile_verifier(spec: Any) -> Verifier:
    """The verifier a spec (module docstring) describes; ValueError naming what is wrong.

    A string holding ":" is a python verifier's name; any other string is a type name.
    """
    if isinstance(spec, str):
        spec = {"type": "python", "fn": spec} if ":" in spec else {"type": spec}
    if isinstance(spec, (list, tuple)):  # a config may hold lists as tuples
        if not spec:
            raise ValueError("an empty verifier list")
        return AllOf(tuple(compile_verifier(part) for part in spec))
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"a verifier is a type name, a 'module:function', a mapping or a list; got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown verifier type {kind!r}; valid: {list(VERIFIER_TYPES)}")
    takes, build = _BUILDERS[kind]
    unknown = sorted(set(spec) - {"type", *takes})
    if unknown:
        raise ValueError(f"verifier {kind!r} takes {list(takes)}, got unknown key(s) {unknown}")
    try:
        return build(dict(spec))
    except ValueError as e:
        raise ValueError(f"verifier {kind!r}: {e}") from None


def verify(verifier: Verifier, record: Record, response: str) -> bool:
    """Whether `response` is right for `record` under a compiled verifier."""
    return bool(verifier(record, clean(response)))
