"""Helpers shared by the task modules (and the data loader): cleaning decoded responses, seeded
generators, splits, reading JSONL."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import numpy as np

# A decoder that keeps special tokens leaves markers such as "<|im_end|>", "<|endoftext|>", "</s>",
# "<eos>" or "<end_of_turn>" after the answer: everything from the first one on is junk.
_SPECIAL_MARKER_RE = re.compile(r"<\||</s>|<eos>|<pad>|<end_of_turn>")


def strip_special(response: str) -> str:
    """`response` cut at the first special-token marker (the marker and everything after it go)."""
    match = _SPECIAL_MARKER_RE.search(response)
    return response if match is None else response[: match.start()]


def answer_line(response: str) -> str:
    """The answer part of a decoded response, whitespace-collapsed.

    Short-answer tasks answer on one line, so the answer is the first non-empty line of the
    response cut at the first special-token marker; later lines are trailing junk (a model that
    missed EOS keeps writing). Returns "" when nothing is left.
    """
    for line in strip_special(response).splitlines():
        words = line.split()
        if words:
            return " ".join(words)
    return ""


def seeded_rng(seed: int, *salt: str) -> np.random.Generator:
    """A numpy generator fixed by `seed` and the `salt` strings.

    Salting with stable CRC32s (Python's `hash` of a str changes per process) gives unrelated
    streams for, e.g., eval records of two contexts drawn with the same seed.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), *(zlib.crc32(s.encode()) for s in salt)])


def check_count(n: int) -> int:
    """`n` as an int, or a ValueError when it is not a non-negative int."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return int(n)


def is_heldout(key: str, fraction: float) -> bool:
    """Whether the item named `key` belongs to the held-out (eval) split.

    A fixed function of the item itself, so eval records (drawn from the held-out part) never
    repeat a prompt that `sft_records` (drawn from the rest) trains on, whatever the seeds.
    """
    return zlib.crc32(key.encode()) % 10_000 < round(fraction * 10_000)


def check_fraction(name: str, value: float, *, closed_right: bool = True) -> None:
    """ValueError naming `name` unless 0 <= value <= 1 (or < 1 when not `closed_right`)."""
    upper_ok = value <= 1.0 if closed_right else value < 1.0
    if not (value >= 0.0 and upper_ok):
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def read_jsonl(
    path: str | os.PathLike, *, what: str = "JSONL file"
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; lines count from 1.

    `what` names the file in the not-found error ("data file", "QA file"). A line that is not
    JSON, or not a JSON object, is a ValueError naming `path:line`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    rows = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, not a traceback
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte column "
                    f"{e.start + 1})"
                ) from None
            if line_no == 1:  # a byte-order mark, as some editors write one (Python's utf-8-sig)
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{line_no}: a record must be a JSON object, got {type(row).__name__}"
                )
            rows.append((line_no, row))
    return rows
