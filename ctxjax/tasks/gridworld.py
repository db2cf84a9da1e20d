"""FrozenLake and Sokoban as single-answer planning tasks, the simulator as the verifier.

The prompt renders a small grid on one line, rows separated by spaces
(`"lake S.H. .... .H.. ...G"`); the answer is a move sequence of U/D/L/R separated by spaces
(`"R R D D D R"`). The context holds "experiential tips"; the right answer is the same with or
without them (regime "nudge"), and `sft_records` makes them matter: with tips the answer is always
the canonical shortest plan, without tips it is, with probability `sloppy_rate`, a plan that fails
in the simulator (cut short, or one move changed).

Rules (the verifier's):
- FrozenLake: deterministic (no slipping). Stepping on a hole `H` or off the grid fails the plan;
  reaching the goal `G` succeeds and ends the episode, so moves after it are ignored (as in Gym).
- Sokoban: `#` wall, `-` floor, `@` player, `$` box, `.` target, `*` box on target, `+` player on
  target; cells outside the drawn grid are walls (the room's outer walls are not drawn, which
  keeps prompts short). A move into a wall, or a push of a box into a wall or another box, is
  ILLEGAL and fails the plan (no silent no-ops: a plan either describes real moves or is wrong).
  The episode ends when every box is on a target; moves after that are ignored.

The canonical answer is the shortest plan that comes first in the move order R, D, L, U (a BFS that
expands moves in that order finds it), so SFT targets are a deterministic function of the level.
Only solvable levels with a plan of at most `max_moves` moves are generated.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
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

Cell = tuple[int, int]
Grid = tuple[str, ...]

DIRS: dict[str, Cell] = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
# Tie-break order among shortest plans ("prefer right then down", as the FrozenLake tips say).
MOVE_ORDER = "RDLU"
_MAX_DRAWS = 100_000
MISTAKES = ("scattered", "systematic")  # how no-context SFT answers go wrong (_GridTask.mistakes)

FROZENLAKE_TIPS = "tips: avoid holes, prefer right then down"
SOKOBAN_TIPS = "tips: stand behind the box and push it to the target"


def parse_plan(response: str) -> list[str] | None:
    """The moves in a response's answer line, or None when it is empty or holds anything else.

    Moves are U/D/L/R (either case), separated by spaces or commas or written together ("RRDD").
    """
    line = answer_line(response)
    moves: list[str] = []
    for token in re.split(r"[\s,]+", line):
        if not token:
            continue
        token = token.upper()
        if any(ch not in DIRS for ch in token):
            return None
        moves.extend(token)
    return moves or None


def _step(cell: Cell, move: str) -> Cell:
    dr, dc = DIRS[move]
    return cell[0] + dr, cell[1] + dc


def _check_rows(grid: Sequence[str], allowed: str) -> Grid:
    rows = tuple(grid)
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise ValueError(f"grid rows must be non-empty and of equal length, got {rows!r}")
    bad = sorted({ch for r in rows for ch in r} - set(allowed))
    if bad:
        raise ValueError(f"grid has characters {bad} outside {allowed!r}: {rows!r}")
    return rows


def _find(rows: Grid, chars: str) -> list[Cell]:
    return [(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch in chars]


# ---------------------------------------------------------------------------------------------
# FrozenLake


def _lake_ends(grid: Sequence[str]) -> tuple[Grid, Cell, Cell]:
    rows = _check_rows(grid, "SGH.")
    starts, goals = _find(rows, "S"), _find(rows, "G")
    if len(starts) != 1 or len(goals) != 1:
        raise ValueError(f"a lake needs exactly one S and one G, got {rows!r}")
    return rows, starts[0], goals[0]


def lake_outcome(grid: Sequence[str], plan: Sequence[str]) -> str:
    """Plays `plan` on a FrozenLake grid: "goal", "hole", "off_grid" or "stopped" (out of moves)."""
    rows, cell, _ = _lake_ends(grid)
    for move in plan:
        cell = _step(cell, move)
        if not (0 <= cell[0] < len(rows) and 0 <= cell[1] < len(rows[0])):
            return "off_grid"
        tile = rows[cell[0]][cell[1]]
        if tile == "H":
            return "hole"
        if tile == "G":
            return "goal"
    return "stopped"


def solve_lake(grid: Sequence[str]) -> list[str] | None:
    """The canonical shortest plan from S to G avoiding holes, or None when G is unreachable."""
    rows, start, goal = _lake_ends(grid)
    parent: dict[Cell, tuple[Cell, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        for move in MOVE_ORDER:
            nxt = _step(cell, move)
            inside = 0 <= nxt[0] < len(rows) and 0 <= nxt[1] < len(rows[0])
            if inside and nxt not in parent and rows[nxt[0]][nxt[1]] != "H":
                parent[nxt] = (cell, move)
                queue.append(nxt)
    if goal not in parent:
        return None
    return _backtrack(parent, goal)


def random_lake(rng: np.random.Generator, size: int, hole_prob: float) -> Grid:
    """A size x size lake, S top-left, G bottom-right, each other tile a hole with `hole_prob`."""
    holes = rng.random((size, size)) < hole_prob
    rows = []
    for r in range(size):
        row = ["H" if holes[r, c] else "." for c in range(size)]
        if r == 0:
            row[0] = "S"
        if r == size - 1:
            row[-1] = "G"
        rows.append("".join(row))
    return tuple(rows)


# ---------------------------------------------------------------------------------------------
# Sokoban

SokobanState = tuple[Cell, frozenset[Cell]]


def parse_sokoban(grid: Sequence[str]) -> tuple[frozenset[Cell], SokobanState, frozenset[Cell]]:
    """(walls, (player, boxes), targets) of a Sokoban grid; ValueError when it is malformed."""
    rows = _check_rows(grid, "#-@$.*+")
    players = _find(rows, "@+")
    boxes, targets = frozenset(_find(rows, "$*")), frozenset(_find(rows, ".*+"))
    if len(players) != 1:
        raise ValueError(f"a Sokoban grid needs exactly one player, got {rows!r}")
    if not boxes or len(boxes) != len(targets):
        raise ValueError(f"a Sokoban grid needs as many targets as boxes (>= 1), got {rows!r}")
    # Cells outside the drawn grid count as walls, so an unbordered grid cannot be walked off.
    walls = set(_find(rows, "#"))
    height, width = len(rows), len(rows[0])
    walls |= {(r, c) for r in (-1, height) for c in range(-1, width + 1)}
    walls |= {(r, c) for c in (-1, width) for r in range(height)}
    return frozenset(walls), (players[0], boxes), targets


def _sokoban_move(walls: frozenset[Cell], state: SokobanState, move: str) -> SokobanState | None:
    """The state after `move`, or None when the move is illegal (into a wall, or a blocked push)."""
    player, boxes = state
    nxt = _step(player, move)
    if nxt in walls:
        return None
    if nxt in boxes:
        beyond = _step(nxt, move)
        if beyond in walls or beyond in boxes:
            return None
        boxes = (boxes - {nxt}) | {beyond}
    return nxt, boxes


def sokoban_outcome(grid: Sequence[str], plan: Sequence[str]) -> str:
    """Plays `plan` on a Sokoban grid: "solved", "illegal" or "unsolved" (moves ran out)."""
    walls, state, targets = parse_sokoban(grid)
    if state[1] == targets:
        return "solved"
    for move in plan:
        state = _sokoban_move(walls, state, move)
        if state is None:
            return "illegal"
        if state[1] == targets:
            return "solved"
    return "unsolved"


def solve_sokoban(grid: Sequence[str], max_moves: int = 64) -> list[str] | None:
    """The canonical shortest solution of at most `max_moves` moves, or None when there is none."""
    walls, start, targets = parse_sokoban(grid)
    parent: dict[SokobanState, tuple[SokobanState, str] | None] = {start: None}
    depth = {start: 0}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if state[1] == targets:
            return _backtrack(parent, state)
        if depth[state] == max_moves:
            continue
        for move in MOVE_ORDER:
            nxt = _sokoban_move(walls, state, move)
            if nxt is not None and nxt not in parent:
                parent[nxt] = (state, move)
                depth[nxt] = depth[state] + 1
                queue.append(nxt)
    return None


def random_sokoban(rng: np.random.Generator, size: int, n_walls: int) -> Grid:
    """A size x size room (its surrounding walls implicit, not drawn) with `n_walls` inner walls,
    one box, one target and one player.

    Box, target and player sit on distinct floor cells (so the level is not already solved); the
    level may be unsolvable, which the caller checks with `solve_sokoban`.
    """
    cells = [(r, c) for r in range(size) for c in range(size)]
    picks = [cells[int(i)] for i in rng.permutation(len(cells))[: n_walls + 3]]
    walls, (box, target, player) = set(picks[:n_walls]), picks[n_walls:]
    marks = {box: "$", target: ".", player: "@"}
    return tuple(
        "".join("#" if (r, c) in walls else marks.get((r, c), "-") for c in range(size))
        for r in range(size)
    )


def _backtrack(parent: dict[Any, Any], node: Any) -> list[str]:
    moves = []
    while parent[node] is not None:
        node, move = parent[node]
        moves.append(move)
    return moves[::-1]


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class _GridTask:
    """Shared record logic; subclasses draw, solve and play their own levels."""

    sloppy_rate: float = 0.4
    tips_share: float = 0.5
    # "scattered": each sloppy answer is a fresh failing plan (cut short or one move changed), so
    # the mistakes spread and the right plan stays the no-context mode: greedy answers without tips
    # are about as good as with them. "systematic": the plan without its last move, one rule for
    # every level, so with sloppy_rate > 0.5 the mistake is the mode and the tips change the greedy
    # answer too. (A failing plan fixed per level by its hash did not: held-out levels are new.)
    mistakes: str = "scattered"
    max_moves: int = 10
    heldout_fraction: float = 0.2
    tips: str = ""
    name: str = ""
    prefix: str = ""

    def __post_init__(self) -> None:
        check_fraction("sloppy_rate", self.sloppy_rate)
        check_fraction("tips_share", self.tips_share)
        check_fraction("heldout_fraction", self.heldout_fraction, closed_right=False)
        if self.heldout_fraction == 0.0:
            raise ValueError(
                "heldout_fraction must be > 0 (eval records come from the held-out split)"
            )
        if self.mistakes not in MISTAKES:
            raise ValueError(f"mistakes must be one of {MISTAKES}, got {self.mistakes!r}")
        if self.max_moves < 1:
            raise ValueError(f"max_moves must be >= 1, got {self.max_moves}")
        if not self.tips.strip():
            raise ValueError("tips must be a non-empty context text")

    def contexts(self) -> dict[str, str]:
        """The one context this task knows: `{"tips": <tips text>}`."""
        return {"tips": self.tips}

    def regime(self, context_name: str) -> str:
        """ "nudge": tips never change the right plan, they make the model find it."""
        self._check_context(context_name)
        return "nudge"

    def eval_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` held-out levels, the tips as context, the canonical shortest plan as answer."""
        return self._context_records(context_name, n, seed, heldout=True)

    def train_records(self, context_name: str, n: int, seed: int) -> list[dict[str, Any]]:
        """Like `eval_records` but from the training split: the levels distillation trains on."""
        return self._context_records(context_name, n, seed, heldout=False)

    def _context_records(self, context_name: str, n: int, seed: int, *, heldout: bool):
        self._check_context(context_name)
        rng = seeded_rng(seed, self.name, "eval" if heldout else "train", context_name)
        return [
            self._record(grid, plan, self.tips, sloppy=False)
            for grid, plan in (
                self._draw_level(rng, heldout=heldout) for _ in range(check_count(n))
            )
        ]

    def sft_records(self, n: int, seed: int) -> list[dict[str, Any]]:
        """With tips (share `tips_share`): the shortest plan. Without: a failing plan with
        probability `sloppy_rate`, else the shortest plan."""
        n = check_count(n)
        rng = seeded_rng(seed, self.name, "sft")
        records = []
        while len(records) < n:
            grid, plan = self._draw_level(rng, heldout=False)
            if rng.random() < self.tips_share:
                records.append(self._record(grid, plan, self.tips, sloppy=False))
            elif rng.random() < self.sloppy_rate:
                bad = plan[:-1] if self.mistakes == "systematic" else None
                bad = bad or self._failing_plan(rng, grid, plan)
                if bad is not None:  # none found for this level: draw another level
                    records.append(self._record(grid, bad, "", sloppy=True))
            else:
                records.append(self._record(grid, plan, "", sloppy=False))
        return records

    def verify(self, record: dict[str, Any], response: str) -> bool:
        """Whether the plan in `response` succeeds on the record's level; malformed plans fail."""
        plan = parse_plan(response)
        return plan is not None and self.plan_succeeds(record["grid"], plan)

    def plan_succeeds(self, grid: Sequence[str], plan: Sequence[str]) -> bool:
        raise NotImplementedError

    def _solve(self, grid: Grid) -> list[str] | None:
        raise NotImplementedError

    def _random_grid(self, rng: np.random.Generator) -> Grid:
        raise NotImplementedError

    def _draw_level(self, rng: np.random.Generator, *, heldout: bool) -> tuple[Grid, list[str]]:
        for _ in range(_MAX_DRAWS):
            grid = self._random_grid(rng)
            if is_heldout(" ".join(grid), self.heldout_fraction) != heldout:
                continue
            plan = self._solve(grid)
            if plan is not None and 1 <= len(plan) <= self.max_moves:
                return grid, plan
        raise RuntimeError(
            f"{self.name}: no solvable level within {self.max_moves} moves in {_MAX_DRAWS} draws; "
            "loosen max_moves or the level settings"
        )

    def _failing_plan(
        self, rng: np.random.Generator, grid: Grid, plan: list[str]
    ) -> list[str] | None:
        # A plausible mistake: the plan cut one or two moves short (a prefix of a shortest plan
        # never finishes), or one move changed. Each candidate is checked in the simulator.
        for _ in range(20):
            if len(plan) >= 2 and rng.random() < 0.5:
                candidate = plan[: len(plan) - int(rng.integers(1, min(2, len(plan) - 1) + 1))]
            else:
                i = int(rng.integers(len(plan)))
                others = [m for m in MOVE_ORDER if m != plan[i]]
                candidate = [*plan[:i], others[int(rng.integers(3))], *plan[i + 1 :]]
            if not self.plan_succeeds(grid, candidate):
                return candidate
        return None

    def _record(self, grid: Grid, plan: list[str], context: str, *, sloppy: bool) -> dict[str, Any]:
        return {
            "context": context,
            "prompt": f"{self.prefix} {' '.join(grid)}",
            "answer": " ".join(plan),
            "grid": list(grid),
            "sloppy": sloppy,
        }

    def _check_context(self, context_name: str) -> None:
        if context_name not in self.contexts():
            raise ValueError(f"unknown context {context_name!r}; valid: {sorted(self.contexts())}")


@dataclass(frozen=True)
class FrozenLakeTask(_GridTask):
    """FrozenLake planning: a size x size lake, S top-left, G bottom-right, random holes."""

    size: int = 4
    hole_prob: float = 0.25
    tips: str = FROZENLAKE_TIPS
    name: str = "frozenlake"
    prefix: str = "lake"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 2:
            raise ValueError(f"size must be >= 2, got {self.size}")
        check_fraction("hole_prob", self.hole_prob, closed_right=False)

    def plan_succeeds(self, grid: Sequence[str], plan: Sequence[str]) -> bool:
        """Whether `plan` reaches G without a hole or leaving the grid."""
        return lake_outcome(grid, plan) == "goal"

    def _solve(self, grid: Grid) -> list[str] | None:
        return solve_lake(grid)

    def _random_grid(self, rng: np.random.Generator) -> Grid:
        return random_lake(rng, self.size, self.hole_prob)


@dataclass(frozen=True)
class SokobanTask(_GridTask):
    """Sokoban planning: a size x size room (outer walls implicit), `n_walls` inner walls, one
    box, one target. The 4x4 default with one wall has about 5,000 solvable levels."""

    size: int = 4
    n_walls: int = 1
    tips: str = SOKOBAN_TIPS
    name: str = "sokoban"
    prefix: str = "sokoban"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size < 2:
            raise ValueError(f"size must be >= 2, got {self.size}")
        if not 0 <= self.n_walls <= self.size**2 - 3:
            raise ValueError(
                f"n_walls must be in [0, {self.size**2 - 3}] for size {self.size}, "
                f"got {self.n_walls}"
            )

    def plan_succeeds(self, grid: Sequence[str], plan: Sequence[str]) -> bool:
        """Whether `plan` puts every box on a target with legal moves only."""
        return sokoban_outcome(grid, plan) == "solved"

    def _solve(self, grid: Grid) -> list[str] | None:
        return solve_sokoban(grid, self.max_moves)

    def _random_grid(self, rng: np.random.Generator) -> Grid:
        return random_sokoban(rng, self.size, self.n_walls)
