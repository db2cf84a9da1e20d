"""Grid-world task options: systematic mistakes make the no-context mode a failing plan."""

import collections

import pytest

from ctxjax.tasks.gridworld import FrozenLakeTask, SokobanTask


def _no_context_modes_fail(task, n=6000):
    """Share of the levels (seen >= 5 times without tips) whose most common answer fails."""
    answers, grids = collections.defaultdict(collections.Counter), {}
    for r in task.sft_records(n, seed=1):
        if not r["context"]:
            answers[r["prompt"]][r["answer"]] += 1
            grids[r["prompt"]] = r["grid"]
    seen = [p for p, c in answers.items() if sum(c.values()) >= 5]
    assert len(seen) >= 20
    modes = [answers[p].most_common(1)[0][0].split() for p in seen]
    return sum(not task.plan_succeeds(grids[p], m) for p, m in zip(seen, modes, strict=True)) / len(
        seen
    )


@pytest.mark.parametrize("cls", [FrozenLakeTask, SokobanTask])
def test_systematic_mistakes_drop_the_last_move(cls):
    task = cls(mistakes="systematic", sloppy_rate=0.6)
    sloppy = [r for r in task.sft_records(600, seed=0) if r["sloppy"]]
    assert sloppy
    for r in sloppy:
        right = task._solve(tuple(r["grid"]))  # the canonical plan, recomputed
        moves = r["answer"].split()
        assert r["context"] == "" and not task.plan_succeeds(r["grid"], moves)
        if len(right) >= 2:
            assert moves == right[:-1]


def test_systematic_mistakes_make_the_mistake_the_no_context_mode():
    # Sloppy answers over half of the no-context records: with one rule the mistake is the mode
    # of nearly every level; scattered over several failing plans, the right plan often still is.
    systematic = FrozenLakeTask(mistakes="systematic", sloppy_rate=0.8, tips_share=0.3)
    scattered = FrozenLakeTask(sloppy_rate=0.8, tips_share=0.3)
    assert _no_context_modes_fail(systematic) > 0.95
    assert _no_context_modes_fail(scattered) < 0.8


def test_unknown_mistakes_are_refused():
    with pytest.raises(ValueError, match=r"mistakes must be one of \('scattered', 'systematic'\)"):
        FrozenLakeTask(mistakes="random")
