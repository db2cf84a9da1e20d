"""Task generators and verifiers: the records training and evaluation run on.

A record is a dict `{"context": str, "prompt": str, "answer": str, ...}`; the extra keys are what
the task's verifier needs. `context` may be "" (no context). The no-context view of a record is the
same prompt with context "" and is scored against the same answer.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Record = dict[str, Any]


@runtime_checkable
class Task(Protocol):
    """What training and evaluation need from a task."""

    name: str

    def contexts(self) -> dict[str, str]:
        """Context name -> context text, for the contexts this task knows."""
        ...

    def regime(self, context_name: str) -> str:
        """ "flip" (the context changes the right answer), "nudge" (it only helps) or "format"."""
        ...

    def eval_records(self, context_name: str, n: int, seed: int) -> list[Record]:
        """`n` records whose context is that context's text and whose answer is right under it."""
        ...

    def train_records(self, context_name: str, n: int, seed: int) -> list[Record]:
        """Like `eval_records`, from the training split: the prompts distillation trains on."""
        ...

    def sft_records(self, n: int, seed: int) -> list[Record]:
        """The supervised mixture that teaches a base model to read the contexts."""
        ...

    def verify(self, record: Record, response: str) -> bool:
        """Whether a decoded response (maybe with trailing junk) is right for the record."""
        ...


# Imported after `Task` so that the task modules may import this package without a cycle.
from ctxjax.tasks.gridworld import FrozenLakeTask, SokobanTask  # noqa: E402
from ctxjax.tasks.qa import MathTask, MCQTask  # noqa: E402
from ctxjax.tasks.synthetic import SyntheticTask  # noqa: E402
from ctxjax.tasks.worked import WorkedSumsTask  # noqa: E402

TASKS: dict[str, type] = {
    "synthetic": SyntheticTask,
    "frozenlake": FrozenLakeTask,
    "sokoban": SokobanTask,
    "mcq": MCQTask,
    "math": MathTask,
    "worked": WorkedSumsTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """The task registered as `name`, built with `kwargs` (its dataclass fields).

    Unknown names and unknown options raise ValueError naming the valid ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
    cls = TASKS[name]
    valid = sorted(f for f in cls.__dataclass_fields__ if f != "name")
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {name!r}; valid: {valid}")
    return cls(**kwargs)
