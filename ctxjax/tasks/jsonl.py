"""A user's JSONL records as an evaluable task.

Records: `{"prompt": str, "context"?: str, "answer"?: str, "verifier"?: spec, ...}`, plus whatever
fields their verifier reads (e.g. `options`).

Splits. `eval_file` is the eval split; or, with `eval_fraction` > 0 and no `eval_file`, a held-out
share of `train_file` chosen by a hash of the prompt (`common.is_heldout`): a fixed function of the
prompt, so train and eval never share one, whatever the seeds and the record order.

Contexts. A record's context is its own non-empty `context`, else the run-level `context` (what
`data.resolve_context` gives for `data.context` / `data.context_file`; the same rule as
`data.encode_record`). A record with neither is an error: there is nothing to distill. Distinct
context texts are named `ctx0`, `ctx1`, ... in order of first appearance in the eval split (the
train split when there is none); `context_name(text)` maps a text to its name. With several
contexts, evaluating one measures retention over the others (`evaluate.evaluate_context`).

Verifiers (`ctxjax.tasks.verifiers`, spec format in its docstring). The run's `verifier` applies to
every record without its own `"verifier"`, which replaces it. Every spec is compiled, and every
eval record checked against its verifier, when the task is built: an unknown type, a missing field
or an unimportable function is a one-line ValueError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ctxjax.data import load_jsonl
from ctxjax.tasks.common import check_count, check_fraction, is_heldout, seeded_rng
from ctxjax.tasks.verifiers import Verifier, compile_verifier, verify

Record = dict[str, Any]
REGIMES = ("flip", "nudge", "format")


def _spec_key(spec: Any) -> str:
    """A verifier spec as a canonical string: equal specs compile once."""
    return json.dumps(spec, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class JsonlTask:
    """The `ctxjax.tasks.Task` protocol over a user's JSONL files (module docstring).

    train_file: the records distillation trains on (`train_split`); optional when only evaluating.
    eval_file: the eval records; excludes `eval_fraction`.
    eval_fraction: share of `train_file`'s prompts held out for evaluation, in [0, 1).
    context: the run-level context text, for records without their own.
    verifier: the run's verifier spec; None: every eval record must carry its own.
    context_regime: what `regime()` reports for every context ("flip", "nudge" or "format").
    """

    train_file: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.0
    context: str = ""
    verifier: Any = None
    context_regime: str = "nudge"
    name: str = "jsonl"

    def __post_init__(self) -> None:
        check_fraction("eval_fraction", self.eval_fraction, closed_right=False)
        if self.context_regime not in REGIMES:
            raise ValueError(
                f"context_regime must be one of {REGIMES}, got {self.context_regime!r}"
            )
        if not self.train_file and not self.eval_file:
            raise ValueError("the jsonl task needs train_file or eval_file")
        if self.eval_file and self.eval_fraction:
            # A preset's eval_file plus a user's eval_fraction: name both and how to clear the file.
            raise ValueError(
                f"eval_file={self.eval_file!r} and eval_fraction={self.eval_fraction} both give "
                "an eval split: keep one (a run's data.eval_file=null clears a preset's file)"
            )
        train, evals = self._split()
        train = [self._with_context(r) for r in train]
        evals = [self._with_context(r) for r in evals]
        compiled = self._compile_all(train + evals)
        for record in evals:
            self._check_verifiable(record, compiled)
        names: dict[str, str] = {}
        for record in evals or train:
            names.setdefault(record["context"], f"ctx{len(names)}")
        object.__setattr__(self, "train_split", tuple(train))
        object.__setattr__(self, "eval_split", tuple(evals))
        object.__setattr__(self, "_compiled", compiled)
        object.__setattr__(self, "_names", names)

    # -- loading ------------------------------------------------------------------------------

    def _split(self) -> tuple[list[Record], list[Record]]:
        train = load_jsonl(self.train_file) if self.train_file else []
        if self.eval_file:
            return train, load_jsonl(self.eval_file)
        if not self.eval_fraction:
            return train, []
        evals = [r for r in train if is_heldout(r["prompt"], self.eval_fraction)]
        train = [r for r in train if not is_heldout(r["prompt"], self.eval_fraction)]
        if not evals:
            raise ValueError(
                f"{self.train_file}: eval_fraction={self.eval_fraction} holds out no prompt; "
                "raise it or give an eval_file"
            )
        if not train:
            raise ValueError(
                f"{self.train_file}: eval_fraction={self.eval_fraction} holds out every prompt; "
                "no training records are left"
            )
        return train, evals

    def _with_context(self, record: Record) -> Record:
        context = record.get("context") or self.context
        if not context.strip():
            raise ValueError(
                f"{record['_source']}: no 'context' and no run-level context "
                "(data.context / data.context_file): nothing to distill"
            )
        return dict(record, context=context)

    def _compile_all(self, records: list[Record]) -> dict[str, Verifier]:
        """Every distinct spec (the run's, each record's) compiled once, by its canonical key."""
        compiled: dict[str, Verifier] = {}
        if self.verifier is not None:
            try:
                compiled[_spec_key(self.verifier)] = compile_verifier(self.verifier)
            except ValueError as e:
                raise ValueError(f"the run's verifier: {e}") from None
        for record in records:
            if "verifier" not in record:
                continue
            key = _spec_key(record["verifier"])
            if key not in compiled:
                try:
                    compiled[key] = compile_verifier(record["verifier"])
                except ValueError as e:
                    raise ValueError(f"{record['_source']}: 'verifier': {e}") from None
        return compiled

    def _check_verifiable(self, record: Record, compiled: dict[str, Verifier]) -> None:
        own = "verifier" in record
        spec = record["verifier"] if own else self.verifier
        if spec is None:
            raise ValueError(
                f"{record['_source']}: no verifier: give the record a 'verifier' or set the run's"
            )
        try:
            compiled[_spec_key(spec)].check(record)
        except ValueError as e:
            whose = "'verifier'" if own else "the run's verifier"
            raise ValueError(f"{record['_source']}: {whose} {spec!r}: {e}") from None

    # -- the Task protocol --------------------------------------------------------------------

    def contexts(self) -> dict[str, str]:
        """Context name (`ctx0`, ...) -> text, for the contexts of the eval split (else train)."""
        return {name: text for text, name in self._names.items()}

    def context_name(self, text: str) -> str:
        """The name of a context text (e.g. the run-level one); ValueError when no record has it."""
        if text not in self._names:
            raise ValueError(f"no record has the context {text[:60]!r}")
        return self._names[text]

    def regime(self, context_name: str) -> str:
        """`context_regime`, the same for every context (the task cannot tell on its own)."""
        self._text(context_name)
        return self.context_regime

    def eval_records(self, context_name: str, n: int, seed: int) -> list[Record]:
        """At most `n` eval records of that context, a seeded sample without repeats.

        Unlike the generated tasks, a user's eval set is never repeated to reach `n`: a repeated
        item would count twice in every accuracy and interval.
        """
        pool = self._pool(self.eval_split, context_name, "eval")
        order = seeded_rng(seed, self.name, "eval", context_name).permutation(len(pool))
        return [dict(pool[int(i)]) for i in order[: check_count(n)]]

    def train_records(self, context_name: str, n: int, seed: int) -> list[Record]:
        """`n` training records of that context: seeded shuffled passes over them (repeating)."""
        pool = self._pool(self.train_split, context_name, "train")
        rng = seeded_rng(seed, self.name, "train", context_name)
        out: list[Record] = []
        while len(out) < check_count(n):
            out.extend(dict(pool[int(i)]) for i in rng.permutation(len(pool)))
        return out[:n]

    def sft_records(self, n: int, seed: int) -> list[Record]:
        raise ValueError(
            "the jsonl task has no SFT mixture to build a base model from; "
            "set student= to the model to distill"
        )

    def verify(self, record: Record, response: str) -> bool:
        """The record's own verifier, else the run's, on the decoded response."""
        spec = record.get("verifier", self.verifier)
        if spec is None:
            raise ValueError(f"{record.get('_source', 'record')}: no verifier")
        verifier = self._compiled.get(_spec_key(spec))
        if verifier is None:  # a record this task did not load: compile and check it now
            verifier = compile_verifier(spec)
            verifier.check(record)
        return verify(verifier, record, response)

    # -- helpers ------------------------------------------------------------------------------

    def _text(self, context_name: str) -> str:
        contexts = self.contexts()
        if context_name not in contexts:
            raise ValueError(f"unknown context {context_name!r}; valid: {sorted(contexts)}")
        return contexts[context_name]

    def _pool(self, split: tuple[Record, ...], context_name: str, which: str) -> list[Record]:
        text = self._text(context_name)
        pool = [r for r in split if r["context"] == text]
        if not pool:
            where = self.eval_file or self.train_file
            raise ValueError(f"{where}: no {which} records with context {context_name!r}")
        return pool
