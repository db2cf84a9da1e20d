"""Worked sums: answers of free length, so the length of an answer (Δlen) can change.

A prompt asks for the sum of a few numbers ("sum 37 48 15"). The "steps" context asks for the
worked solution, one partial sum per line, then the result after `####`:

    37 + 48 = 85
    85 + 15 = 100
    #### 100

while without a context (and under "terse") the answer is the result alone ("#### 100"). The
verifier checks only the final number (`qa.extract_number`), so a worked and a terse answer with the
same result are both right, and the length of the answer is the model's choice.

The steps are meant to help a tiny model add (one two-term sum per line instead of a multi-term
sum in one go), so "steps" is a nudge that also lengthens the answer. Distilling it into the
no-context view is the paper's setting for length inflation: after OPD, does the answer with the
context put back grow? `sloppy_rate` answers that share of the no-context SFT records with a near
miss, as `qa.py` does, so the context is worth reading even where the base could add without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctxjax.tasks.common import check_count, check_fraction, is_heldout, seeded_rng
from ctxjax.tasks.qa import extract_number

CONTEXTS = {
    "steps": "Show each partial sum on a line, then the result after ####.",
    "terse": "Only the result, after ####.",
}
REGIMES = {"steps": "nudge", "terse": "format"}


def worked_solution(terms: list[int]) -> str:
    """One `a + b = s` line per partial sum, then `#### total`."""
    lines, total = [], terms[0]
    for t in terms[1:]:
        lines.append(f"{total} + {t} = {total + t}")
        total += t
    return "\n".join([*lines, f"#### {total}"])


def terse_answer(terms: list[int]) -> str:
    return f"#### {sum(terms)}"


@dataclass(frozen=True)
class WorkedSumsTask:
    """Sums of `min_terms`..`max_terms` numbers in 1..`max_value`.

    eval_fraction: share of the prompts (by a hash of the prompt, not the seed) held out for
      evaluation. sft_context_share: share of the SFT records that carry a context (half each).
    sloppy_rate: share of the no-context SFT answers given a wrong result.
    """

    min_terms: int = 2
    max_terms: int = 4
    max_value: int = 99
    eval_fraction: float = 0.2
    sft_context_share: float = 0.6
    sloppy_rate: float = 0.3
    name: str = "worked"

    def __post_init__(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(
                f"need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}"
            )
        if self.max_value < 2:
            raise ValueError(f"max_value must be >= 2, got {self.max_value}")
        check_fraction("eval_fraction", self.eval_fraction, closed_right=False)
        if self.eval_fraction == 0.0:  # the split is by prompt: eval needs a held-out share
            raise ValueError("eval_fraction must be > 0")
        check_fraction("sft_context_share", self.sft_context_share)
        check_fraction("sloppy_rate", self.sloppy_rate)

    def contexts(self) -> dict[str, str]:
        return dict(CONTEXTS)

    def regime(self, context_name: str) -> str:
        self._check_context(context_name)
        return REGIMES[context_name]

    def eval_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` held-out prompts under `context_name` (its answer in that context's format)."""
        self._check_context(context_name)
        rng = seeded_rng(seed, self.name, "eval", context_name)
        return [self.record(t, context_name) for t in self._draw(rng, check_count(n), True)]

    def train_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        self._check_context(context_name)
        rng = seeded_rng(seed, self.name, "train", context_name)
        return [self.record(t, context_name) for t in self._draw(rng, check_count(n), False)]

    def sft_records(self, n: int, seed: int) -> list[dict[str, Any]]:
        """A `sft_context_share` of records under a context (each equally often), the rest with
        none and the terse answer, a `sloppy_rate` share of those with a wrong result."""
        rng = seeded_rng(seed, self.name, "sft")
        records = []
        for terms in self._draw(rng, check_count(n), False):
            if rng.random() < self.sft_context_share:
                records.append(self.record(terms, sorted(CONTEXTS)[int(rng.integers(2))]))
            elif rng.random() < self.sloppy_rate:
                miss = int(rng.choice([-2, -1, 1, 2]))
                records.append(dict(self.record(terms, ""), answer=f"#### {sum(terms) + miss}"))
            else:
                records.append(self.record(terms, ""))
        return records

    def record(self, terms: list[int], context_name: str) -> dict[str, Any]:
        """The record of `terms` under a context name ("" = none): worked only under "steps"."""
        answer = worked_solution(terms) if context_name == "steps" else terse_answer(terms)
        return {
            "context": CONTEXTS.get(context_name, ""),
            "prompt": "sum " + " ".join(map(str, terms)),
            "answer": answer,
            "target": str(sum(terms)),
        }

    def verify(self, record: dict[str, Any], response: str) -> bool:
        """Whether the final number of `response` (after `####`, else the last one) is the sum."""
        got = extract_number(response)
        return got is not None and got == int(record["target"])

    def _draw(self, rng: Any, n: int, heldout: bool) -> list[list[int]]:
        """`n` term lists whose prompt is in the held-out split iff `heldout`."""
        out: list[list[int]] = []
        while len(out) < n:
            k = int(rng.integers(self.min_terms, self.max_terms + 1))
            terms = [int(x) for x in rng.integers(1, self.max_value + 1, size=k)]
            key = " ".join(map(str, terms))
            if is_heldout(key, self.eval_fraction) == heldout:
                out.append(terms)
        return out

    def _check_context(self, context_name: str) -> None:
        if context_name not in CONTEXTS:
            raise ValueError(f"unknown context {context_name!r}; valid: {sorted(CONTEXTS)}")
