"""A run's out_dir: refuse to clobber an earlier run, lock it while a run uses it, write atomically,
compare a resumed run's config with the one it started with.

Every refusal is a `RunRefused` whose message is one line that says what to do instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".ctxjax.lock"
HISTORY_FILE = "config_history.jsonl"
# What a run leaves in its out_dir: any of these means "an earlier run lives here".
RUN_MARKERS = ("config.json", "checkpoints", "final", "summary.json")
# What `--overwrite` removes (the markers and the logs that belong to the same run).
# What resumes set aside (checkpoints newer than the one restored, metric rows past it).
SET_ASIDE = "checkpoints.set_aside"
RUN_FILES = (*RUN_MARKERS, "metrics.jsonl", "tb", HISTORY_FILE, SET_ASIDE)
# Keys a resumed run may change without `--allow-config-change`: they do not alter the numbers
# of the steps already taken (`train.steps` does reshape the cosine schedule's tail from here on).
RESUME_ALLOWED = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpoint",
    "train.eval_every",
    "train.out_dir",  # the same run, moved
    "eval.",
)
# Keys that fix the frozen teacher or the starting student: a resume never changes them, not even
# with `--allow-config-change` (the restored steps were taken against that teacher and start).
FROZEN = ("student", "teacher", "tokenizer", "numerics.param_dtype")
# When ctxjax built the base model (no `student`), also every key of its cache key
# (`base.base_key`): another value names another base model, which would become both the
# student's start and the frozen teacher. Not `numerics.scan_layers` (the same base) nor
# `base.cache_dir` (where the cache lives, not what it holds).
FROZEN_WITH_BASE = ("task.name", "task.options", "model", "numerics", "base")
NOT_FROZEN = ("numerics.scan_layers", "base.cache_dir")
# Model folders: compared resolved (a relative path means another folder from another directory).
PATH_KEYS = ("student", "teacher", "tokenizer")


class RunRefused(ValueError):
    """A run that must not start (or go on) as asked; the message is one line."""


def write_atomic(path: str, text: str) -> None:
    """Writes `path` so that a reader (or a crash) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=float))


def holds_run(out_dir: str) -> list[str]:
    """The run files present in `out_dir` (empty: no earlier run). An empty folder (Orbax creates
    `checkpoints/` up front) holds nothing to lose."""
    found = []
    for name in RUN_MARKERS:
        path = os.path.join(out_dir, name)
        if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
            found.append(name)
    return found


def check_out_dir(out_dir: str) -> None:
    """Refuses an out_dir no run can be written to (a file, a folder under a file, a read-only
    folder), before any set-up; nothing is created here."""
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise RunRefused(f"train.out_dir={out_dir}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunRefused(f"train.out_dir={out_dir}: {probe} is not writable")


def check_reusable(out_dir: str, *, resume: bool, overwrite: bool) -> None:
    """Refuses an out_dir that holds a run unless the caller chose `resume` or `overwrite`."""
    if resume and overwrite:
        raise RunRefused("--resume and --overwrite exclude each other: choose one")
    found = holds_run(out_dir)
    if found and not (resume or overwrite):
        raise RunRefused(
            f"{out_dir} already holds a run ({', '.join(found)}): pass --resume to continue it "
            f"or --overwrite to replace it (or choose another train.out_dir)"
        )


def new_aside_dir(root: str, restored: int) -> str:
    """A new folder under `root` for what one resume sets aside (checkpoints newer than the step
    it restored, the metric rows past it): `resume-<n>-from-step-<restored>`, `n` counting up, so
    a later resume never lands in (or over) an earlier one's folder."""
    os.makedirs(root, exist_ok=True)
    n = len(os.listdir(root)) + 1
    while True:
        path = os.path.join(root, f"resume-{n}-from-step-{restored}")
        try:
            os.mkdir(path)  # atomic: of two resumes racing for a name, one gets it
            return path
        except FileExistsError:
            n += 1


def remove_run(out_dir: str) -> None:
    """`--overwrite`: removes the old run's files (called once the new run holds the lock)."""
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class Lock:
    """`out_dir/.ctxjax.lock`, created atomically (O_EXCL) with this host and PID.

    A lock held by a live process refuses. A lock left by a dead process on this host (kill -9,
    an out-of-memory kill, a power cut) is never taken silently: without `take_stale` it is
    reported with how to clear it (the dead run may have been another one than the user thinks);
    with `take_stale` (a `--resume`, which continues whatever run the out_dir holds, so that a
    restart wrapper works after a crash) it is taken over with a warning naming the dead process.
    """

    def __init__(self, out_dir: str, *, take_stale: bool = False):
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.take_stale = take_stale
        self.held = False

    def check_free(self) -> None:
        """Refuses now, before a slow set-up, if the lock is taken (`acquire` is the real test)."""
        if os.path.exists(self.path) and not (self.take_stale and self._stale_owner()):
            raise RunRefused(self._why_taken())

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = self._stale_owner() if self.take_stale else None
            if owner is None:
                raise RunRefused(self._why_taken()) from None
            fd = self._take_over(owner)
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        self.held = True

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            return {"host": str(owner["host"]), "pid": int(owner["pid"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _stale_owner(self) -> dict | None:
        """The lock's owner when it is a dead process on this host, else None."""
        owner = self._owner()
        if owner and owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"]):
            return owner
        return None

    def _take_over(self, owner: dict) -> int:
        # Renaming the stale file away is atomic: of two restarts racing here, one wins the
        # rename and then the O_EXCL create; the other finds a fresh, live lock and is refused.
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except (FileNotFoundError, FileExistsError):
            raise RunRefused(self._why_taken()) from None
        os.remove(aside)
        log.warning(
            "--resume: took over the stale lock %s of PID %d on %s, which is dead (killed or "
            "crashed)",
            self.path,
            owner["pid"],
            owner["host"],
        )
        return fd

    def _why_taken(self) -> str:
        owner = self._owner()
        if owner is None:
            return f"{self.path} exists but is unreadable: if no run uses this out_dir, delete it"
        who = f"PID {owner['pid']} on {owner['host']}"
        if self._stale_owner():
            return (
                f"stale lock {self.path}: {who} is dead (killed or crashed); continue its run with "
                f"--resume (which takes the lock over), or delete the lock file if no other run "
                f"uses this out_dir"
            )
        return f"{self.path}: out_dir is in use by {who}; wait for it or choose another out_dir"

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 0.5}} -> {"loss.beta": 0.5} (dict leaves only; lists stay values)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _nest(flat: dict[str, Any]) -> dict:
    """The inverse of `flatten`."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two run records: {key: (saved, current)}."""
    old, new = flatten(saved), flatten(current)
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def _allowed(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_ALLOWED)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def frozen(key: str, built_base: bool) -> bool:
    """Whether a resume may never change `key` (`FROZEN`; `built_base`: the run's base model was
    built by ctxjax, so its cache key is frozen too)."""
    if _under(key, NOT_FROZEN):
        return False
    return _under(key, FROZEN) or (built_base and _under(key, FROZEN_WITH_BASE))


def resolved_path(value: Any) -> Any:
    """A model folder as an absolute path, `~` expanded ("" and `base:<size>` as they are)."""
    if isinstance(value, str) and value and not value.startswith("base:"):
        return os.path.abspath(os.path.expanduser(value))
    return value


def check_resume_config(
    out_dir: str, current: dict, *, allow_change: bool, defaults: dict | None = None
) -> dict[str, tuple[Any, Any]]:
    """Compares a resumed run's record with `out_dir/config.json`; returns the changes.

    A change of a `frozen` key is always refused; a change outside `RESUME_ALLOWED` is refused
    unless `allow_change`; each names every such key. Model folders compare resolved. Nothing
    is written here: `record_config_change` does, once the run resumes.
    Records written by another version of ctxjax may lack a key or hold one no longer recorded:
    a key the saved record lacks compares with its value in `defaults` (the record of a default
    config), and a key the current record lacks is not compared (nothing reads it any more).
    """
    path = os.path.join(out_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise RunRefused(f"{path} is corrupt ({e}): cannot compare the resumed config") from None
    # JSON round trip: tuples become lists, as in the saved file.
    current = json.loads(json.dumps(current, default=float))
    flat_saved, flat_current = flatten(saved), flatten(current)
    flat_defaults = flatten(json.loads(json.dumps(defaults or {}, default=float)))
    for key in flat_current.keys() - flat_saved.keys():
        if key in flat_defaults:
            flat_saved[key] = flat_defaults[key]
    flat_saved = {k: v for k, v in flat_saved.items() if k in flat_current}
    for key in PATH_KEYS:
        for flat in (flat_saved, flat_current):
            if key in flat:
                flat[key] = resolved_path(flat[key])
    changes = config_changes(_nest(flat_saved), _nest(flat_current))
    built_base = not flatten(saved).get("student")
    fixed = [k for k in changes if frozen(k, built_base)]
    if fixed:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed)
        what = "the base model's cache key" if built_base else "the frozen teacher or the student"
        raise RunRefused(
            f"the resumed config changes {what} ({shown}): a run keeps the teacher and the "
            f"starting student it was trained against, even with --allow-config-change; "
            f"start a new run (another train.out_dir) to change them"
        )
    altering = [k for k in changes if not _allowed(k)]
    if altering and not allow_change:
        shown = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in altering)
        raise RunRefused(
            f"the resumed config differs from {path} in keys that alter the run ({shown}); "
            f"pass --allow-config-change to accept (recorded in {HISTORY_FILE})"
        )
    return changes


def record_config_change(out_dir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Appends `{step, changes: {key: [old, new]}}` to the run's history (config.json keeps the
    config the run started with)."""
    if not changes:
        return
    row = {"step": step, "time": time.time(), "changes": {k: list(v) for k, v in changes.items()}}
    with open(os.path.join(out_dir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
