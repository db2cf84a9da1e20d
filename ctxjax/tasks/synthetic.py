"""A context-following world for tiny models: digit prompts under rules, nudges and formats.

Prompts are a family word and 3-6 digits (`"seq 3 1 4"`, `"sum 3 1 4"`, `"max 3 1 4"`); contexts
come in the three regimes the project measures:

- flip: the context changes the right answer. With no context a `seq` prompt is copied
  (`"3 1 4"`); under `rev` it is reversed (`"4 1 3"`), under `add3` each digit gets +3 mod 10, under
  `sort` sorted ascending, under `drop1` its first digit dropped.
- nudge: the right answer is the same with or without the context (the sum or the largest digit);
  the context only makes the model reliable. `sft_records` answers no-context `sum`/`max` prompts
  with a plausible wrong answer (off by one, a digit forgotten) with probability `sloppy_rate`, and
  prompts under `careful` or `hint` always exactly, so a base model trained on it reaches about
  `1 - sloppy_rate` accuracy without the context and about 1.0 with it at temperature 1.
- format: the context asks for a longer form of the default answer: `words` spells the digits
  (`"three one four"`), `pirate` prefixes `"arr"`, `steps` writes the sum out (`"3 + 1 + 4 = 8"`).
  The verifier checks the format (exact match), and the response-length change is measurable.

Every answer is canonical, so `verify` is an exact match of the response's answer line against the
record's answer (whitespace-collapsed, case-insensitive).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctxjax.tasks.common import (
    answer_line,
    check_count,
    check_fraction,
    is_heldout,
    seeded_rng,
)

FAMILIES = ("seq", "sum", "max")
# Families whose no-context answers are sloppy in `sft_records` (the nudge contexts' prompts).
NUDGE_FAMILIES = ("sum", "max")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Key of the no-context share in `sft_weights`.
NO_CONTEXT = "none"
_MAX_DRAWS = 100_000


def default_options() -> dict[str, Any]:
    """The options of the embedded default world (the run config's default `task.options`, the
    presets and the reproduction grid): `seq` prompts (flip rules, formats) and `max` prompts (the
    nudges), 3-5 digits. A smaller world than `SyntheticTask()`'s, so a CPU base model learns it in
    minutes. A fresh dict of YAML-native values each call: callers may edit or serialize it.
    """
    return {"families": ["seq", "max"], "max_len": 5}


Digits = tuple[int, ...]


def _join(digits: Digits) -> str:
    return " ".join(str(d) for d in digits)


def default_answer(family: str, digits: Digits) -> str:
    """The right answer with no context: COPY for `seq`, the sum for `sum`, the max for `max`."""
    if family == "seq":
        return _join(digits)
    if family == "sum":
        return str(sum(digits))
    if family == "max":
        return str(max(digits))
    raise ValueError(f"unknown family {family!r}; valid: {FAMILIES}")


@dataclass(frozen=True)
class ContextSpec:
    """One named context: its text, regime, the prompt families it applies to, its answer rule."""

    text: str
    regime: str
    families: tuple[str, ...]
    answer: Callable[[str, Digits], str]


CONTEXTS: dict[str, ContextSpec] = {
    "add3": ContextSpec(
        "rule: add three to each digit mod ten",
        "flip",
        ("seq",),
        lambda _, d: _join(tuple((x + 3) % 10 for x in d)),
    ),
    "rev": ContextSpec("rule: reverse the sequence", "flip", ("seq",), lambda _, d: _join(d[::-1])),
    "sort": ContextSpec(
        "rule: sort the digits ascending", "flip", ("seq",), lambda _, d: _join(tuple(sorted(d)))
    ),
    "drop1": ContextSpec("rule: drop the first digit", "flip", ("seq",), lambda _, d: _join(d[1:])),
    "careful": ContextSpec("system: be careful and exact", "nudge", NUDGE_FAMILIES, default_answer),
    "hint": ContextSpec(
        "hint: sum adds every digit, max is the largest digit",
        "nudge",
        NUDGE_FAMILIES,
        default_answer,
    ),
    "words": ContextSpec(
        "format: answer in words",
        "format",
        ("seq",),
        lambda _, d: " ".join(DIGIT_WORDS[x] for x in d),
    ),
    "pirate": ContextSpec(
        "persona: talk like a pirate", "format", ("seq",), lambda _, d: "arr " + _join(d)
    ),
    "steps": ContextSpec(
        "format: show the steps",
        "format",
        ("sum",),
        lambda _, d: " + ".join(str(x) for x in d) + f" = {sum(d)}",
    ),
}


def sloppy_answer(family: str, digits: Digits, rng: np.random.Generator) -> str:
    """A plausible wrong answer to a nudge-family prompt (never equal to the right one).

    `sum`: off by one, or the last digit forgotten. `max`: off by one, the first digit, or the
    second-largest digit. The candidates that happen to equal the right answer are left out.
    """
    if family == "sum":
        right = sum(digits)
        candidates = {right + 1, right - 1, sum(digits[:-1])}
        candidates = {c for c in candidates if c >= 0}
    elif family == "max":
        right = max(digits)
        below = [x for x in digits if x < right]
        candidates = {right + 1, right - 1, digits[0]} | ({max(below)} if below else set())
        candidates = {c for c in candidates if 0 <= c <= 9}
    else:
        raise ValueError(f"family {family!r} has no sloppy answers; valid: {NUDGE_FAMILIES}")
    wrong = sorted(candidates - {right})
    return str(wrong[int(rng.integers(len(wrong)))])


def _normalize(text: str) -> str:
    return " ".join(text.split()).lower()


@dataclass(frozen=True)
class SyntheticTask:
    """The synthetic context-following task (see the module docstring).

    families: prompt families in the mixture (a subset of `FAMILIES`); contexts that apply to no
      enabled family are left out of `contexts()`.
    min_len, max_len: number of digits in a prompt (inclusive range, 2..8).
    sloppy_rate: probability that a no-context `sum`/`max` record in `sft_records` is answered
      wrong.
    sft_weights: relative share of each source in `sft_records`, keyed by context name or `"none"`
      (no-context records); merged over the defaults (`"none"`: one per enabled family, each
      context: 1.0). A weight of 0 leaves a source out.
    heldout_fraction: share of the prompt space kept for `eval_records` (by a hash of the prompt);
      `sft_records` never draws those prompts.
    """

    families: tuple[str, ...] = FAMILIES
    min_len: int = 3
    max_len: int = 6
    sloppy_rate: float = 0.4
    sft_weights: Mapping[str, float] | tuple[tuple[str, float], ...] | None = None
    heldout_fraction: float = 0.2
    name: str = "synthetic"

    def __post_init__(self) -> None:
        families = tuple(self.families)
        object.__setattr__(self, "families", families)
        unknown = [f for f in families if f not in FAMILIES]
        if not families or unknown or len(set(families)) != len(families):
            raise ValueError(f"families must be distinct names from {FAMILIES}, got {families}")
        if not 2 <= self.min_len <= self.max_len <= 8:
            raise ValueError(
                f"need 2 <= min_len <= max_len <= 8, got min_len={self.min_len}, "
                f"max_len={self.max_len}"
            )
        check_fraction("sloppy_rate", self.sloppy_rate)
        check_fraction("heldout_fraction", self.heldout_fraction, closed_right=False)
        if self.heldout_fraction == 0.0:
            raise ValueError(
                "heldout_fraction must be > 0 (eval records come from the held-out split)"
            )
        # Kept as sorted (name, weight) pairs so the task stays hashable like a frozen dataclass.
        overrides = tuple(sorted(dict(self.sft_weights or {}).items()))
        object.__setattr__(self, "sft_weights", overrides or None)
        weights = self._default_weights()
        for key, value in overrides:
            if key not in weights:
                raise ValueError(f"unknown sft_weights key {key!r}; valid: {sorted(weights)}")
            if not value >= 0:
                raise ValueError(f"sft_weights[{key!r}] must be >= 0, got {value!r}")
            weights[key] = float(value)
        if sum(weights.values()) <= 0:
            raise ValueError("sft_weights are all zero: sft_records would have nothing to draw")
        object.__setattr__(self, "_weights", weights)

    def _default_weights(self) -> dict[str, float]:
        weights = {NO_CONTEXT: float(len(self.families))}
        weights.update({name: 1.0 for name in self.contexts()})
        return weights

    def contexts(self) -> dict[str, str]:
        """Context name -> text, for the contexts that apply to an enabled prompt family."""
        return {
            name: spec.text
            for name, spec in CONTEXTS.items()
            if any(f in self.families for f in spec.families)
        }

    def regime(self, context_name: str) -> str:
        """ "flip", "nudge" or "format" for a context name."""
        return self._spec(context_name).regime

    def eval_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` held-out records under `context_name`, answered by that context's rule."""
        return self._context_records(context_name, n, seed, heldout=True)

    def train_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """Like `eval_records` but from the training split: the prompts distillation trains on."""
        return self._context_records(context_name, n, seed, heldout=False)

    def _context_records(self, context_name: str, n: int, seed: int, *, heldout: bool):
        spec = self._spec(context_name)
        n = check_count(n)
        rng = seeded_rng(seed, self.name, "eval" if heldout else "train", context_name)
        families = [f for f in spec.families if f in self.families]
        records = []
        for _ in range(n):
            family = families[int(rng.integers(len(families)))]
            digits = self._draw_digits(rng, family, heldout=heldout)
            records.append(self._record(context_name, family, digits, spec.answer(family, digits)))
        return records

    def sft_records(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` training records: no-context defaults (sloppy for sum/max) and every context."""
        n = check_count(n)
        rng = seeded_rng(seed, self.name, "sft")
        sources = list(self._weights)
        p = np.array([self._weights[s] for s in sources])
        p = p / p.sum()
        records = []
        for _ in range(n):
            source = sources[int(rng.choice(len(sources), p=p))]
            if source == NO_CONTEXT:
                records.append(self._no_context_record(rng))
                continue
            spec = CONTEXTS[source]
            families = [f for f in spec.families if f in self.families]
            family = families[int(rng.integers(len(families)))]
            digits = self._draw_digits(rng, family, heldout=False)
            records.append(self._record(source, family, digits, spec.answer(family, digits)))
        return records

    def verify(self, record: dict[str, Any], response: str) -> bool:
        """Exact match of the response's answer line against the record's answer."""
        return _normalize(answer_line(response)) == _normalize(record["answer"])

    def _no_context_record(self, rng: np.random.Generator) -> dict[str, Any]:
        family = self.families[int(rng.integers(len(self.families)))]
        digits = self._draw_digits(rng, family, heldout=False)
        sloppy = family in NUDGE_FAMILIES and rng.random() < self.sloppy_rate
        answer = sloppy_answer(family, digits, rng) if sloppy else default_answer(family, digits)
        return self._record("", family, digits, answer, sloppy=sloppy)

    def _draw_digits(self, rng: np.random.Generator, family: str, *, heldout: bool) -> Digits:
        # Rejection sampling on the prompt hash: about 1 / heldout_fraction draws per eval prompt.
        for _ in range(_MAX_DRAWS):
            length = int(rng.integers(self.min_len, self.max_len + 1))
            digits = tuple(int(x) for x in rng.integers(0, 10, size=length))
            if is_heldout(_prompt(family, digits), self.heldout_fraction) == heldout:
                return digits
        split = "held-out" if heldout else "training"
        raise RuntimeError(
            f"no {split} {family!r} prompt in {_MAX_DRAWS} draws; "
            f"heldout_fraction={self.heldout_fraction} leaves that split (nearly) empty"
        )

    def _record(
        self, context_name: str, family: str, digits: Digits, answer: str, *, sloppy: bool = False
    ) -> dict[str, Any]:
        return {
            "context": CONTEXTS[context_name].text if context_name else "",
            "prompt": _prompt(family, digits),
            "answer": answer,
            "context_name": context_name,
            "family": family,
            "digits": list(digits),
            "sloppy": sloppy,
        }

    def _spec(self, context_name: str) -> ContextSpec:
        valid = self.contexts()
        if context_name not in valid:
            raise ValueError(f"unknown context {context_name!r}; valid: {sorted(valid)}")
        return CONTEXTS[context_name]


def _prompt(family: str, digits: Digits) -> str:
    return f"{family} {_join(digits)}"
