"""Grid-world task options: consistent mistakes make the no-context mode a failing plan."""

import collections

import pytest

from ctxjax.tasks.gridworld import FrozenLakeTask, SokobanTask


def _sloppy_answers(task, n=3000):
    by_level = collections.defaultdict(list)
    for r in task.sft_records(n, seed=0):
        if r["sloppy"]:
            assert r["context"] == "" and not task.plan_succeeds(r["grid"], r["answer"].split())
            by_level[r["prompt"]].append(r["answer"])
    return by_level


@pytest.mark.parametrize("cls", [FrozenLakeTask, SokobanTask])
def test_consistent_mistakes_give_one_failing_plan_per_level(cls):
    by_level = _sloppy_answers(cls(consistent_mistakes=True, sloppy_rate=0.6))
    repeated = [answers for answers in by_level.values() if len(answers) > 1]
    assert repeated and all(len(set(answers)) == 1 for answers in repeated)


def test_mistakes_scatter_by_default():
    by_level = _sloppy_answers(FrozenLakeTask(sloppy_rate=0.6))
    repeated = [answers for answers in by_level.values() if len(answers) > 1]
    assert any(len(set(answers)) > 1 for answers in repeated)


def test_consistent_mistakes_with_majority_sloppy_make_the_mistake_the_no_context_mode():
    task = FrozenLakeTask(consistent_mistakes=True, sloppy_rate=0.8, tips_share=0.3)
    answers, grids = collections.defaultdict(collections.Counter), {}
    for r in task.sft_records(6000, seed=1):
        if not r["context"]:
            answers[r["prompt"]][r["answer"]] += 1
            grids[r["prompt"]] = r["grid"]
    seen = [p for p, c in answers.items() if sum(c.values()) >= 5]
    modes_fail = [
        not task.plan_succeeds(grids[p], answers[p].most_common(1)[0][0].split()) for p in seen
    ]
    assert len(seen) >= 20 and sum(modes_fail) / len(seen) > 0.8
    # Without the option the right plan stays the mode: the mistakes split over many plans.
    task = FrozenLakeTask(sloppy_rate=0.8, tips_share=0.3)
    answers, grids = collections.defaultdict(collections.Counter), {}
    for r in task.sft_records(6000, seed=1):
        if not r["context"]:
            answers[r["prompt"]][r["answer"]] += 1
            grids[r["prompt"]] = r["grid"]
    seen = [p for p, c in answers.items() if sum(c.values()) >= 5]
    modes_fail = [
        not task.plan_succeeds(grids[p], answers[p].most_common(1)[0][0].split()) for p in seen
    ]
    assert len(seen) >= 20 and sum(modes_fail) / len(seen) < 0.8
