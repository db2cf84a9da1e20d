"""Records `{prompt, answer?, context?}` -> fixed-size token batches through grain pipelines.

Each record becomes two left-padded views of one chat turn: `[x]` (no context, what the student
samples from) and `[c|x]` (context as the system message, what the teacher and the NCA pass see).
Budgets are fixed per run so the jitted train step compiles once; nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctxjax.hf import CHAT_PLACEMENTS, eos_and_pad, render_chat
from ctxjax.padding import pad_left
from ctxjax.tasks.common import read_jsonl


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the records come from and how they become batches."""

    train_file: str | None = None  # JSONL, one record per line
    # JSONL eval split of a `task.name=jsonl` run (or `task.options.eval_fraction` of train_file).
    eval_file: str | None = None
    context: str = ""  # run-level context for records that carry none
    context_file: str | None = None  # its text is the run-level context (excludes `context`)
    # Where the context goes in the chat (`hf.render_chat`): "system" (the system message) or
    # "user" (before the prompt in the user message, for templates without a system role).
    context_placement: str = "system"
    batch_size: int = 16
    max_prompt_tokens: int = 64  # fixed length of the rendered no-context prompt [x]
    max_context_prompt_tokens: int = 128  # fixed length of the rendered [c|x]
    shuffle: bool = True
    seed: int = 0
    worker_count: int = 0  # grain worker processes; 0 encodes in the calling process

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_prompt_tokens", "max_context_prompt_tokens"):
            value = getattr(self, key)
            if value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        # grain seeds are unsigned 32-bit integers.
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed must be in [0, 2**32), got {self.seed}")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {self.worker_count}")
        if self.context and self.context_file:
            raise ValueError("data.context and data.context_file are both set; set at most one")
        if self.context_placement not in CHAT_PLACEMENTS:
            raise ValueError(
                f"data.context_placement must be one of {list(CHAT_PLACEMENTS)}, "
                f"got {self.context_placement!r}"
            )


# ----------------------------------------------------------------------------------------------
# Records


def _where(index: int | None, record: dict[str, Any]) -> str:
    """`record 3 (train.jsonl:4)`: how error messages point at a record."""
    name = "record" if index is None else f"record {index}"
    source = record.get("_source") if isinstance(record, dict) else None
    return f"{name} ({source})" if source else name


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise ValueError(f"{where}: missing 'prompt'")
    for key in ("prompt", "context", "answer"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")


def load_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads one record per non-blank line; each gets `_source = "path:line"` for later errors."""
    records = []
    for line_no, record in read_jsonl(path, what="data file"):
        where = f"{os.fspath(path)}:{line_no}"
        _check_record(record, where)
        record["_source"] = where
        records.append(record)
    if not records:
        raise ValueError(f"data file holds no records: {os.fspath(path)}")
    return records


def check_has_context(records: Sequence[dict[str, Any]], run_context: str) -> None:
    """Refuses a data set with nothing to distill: no record has a context and no run-level
    context is set, so teacher and student would see the same prompt."""
    if not run_context and not any(r.get("context") for r in records):
        source = records[0].get("_source", "").rsplit(":", 1)[0] if records else ""
        raise ValueError(
            f"no record{f' of {source}' if source else ''} has a 'context' and neither "
            f"data.context nor data.context_file is set: there is no context to distill"
        )


def resolve_context(cfg: DataConfig) -> str:
    """The run-level context: `cfg.context`, or the text of `cfg.context_file`."""
    if not cfg.context_file:
        return cfg.context
    if not os.path.isfile(cfg.context_file):
        raise FileNotFoundError(f"data.context_file not found: {cfg.context_file}")
    with open(cfg.context_file, encoding="utf-8") as f:
        # Editors end files with a newline that is not part of the context.
        text = f.read().rstrip("\n")
    if not text.strip():
        raise ValueError(f"data.context_file is empty: {cfg.context_file}")
    return text


def _render_view(
    tokenizer: Any, context: str, prompt: str, cfg: DataConfig, key: str, where: str, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One chat view left-padded to the budget `data.<key>`: `(ids_L, mask_L)`."""
    ids = render_chat(tokenizer, context, prompt, placement=cfg.context_placement)
    budget = getattr(cfg, key)
    if len(ids) > budget:
        raise ValueError(
            f"{where}: the rendered {'[c|x]' if context else '[x]'} view has {len(ids)} tokens, "
            f"more than data.{key}={budget}; raise data.{key} or shorten the record"
        )
    ids_1xL, mask_1xL = pad_left([ids], budget, pad_id)
    return ids_1xL[0], mask_1xL[0]


def encode_record(
    record: dict[str, Any],
    tokenizer: Any,
    run_context: str,
    cfg: DataConfig,
    *,
    index: int,
    pool: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Renders one record's `[x]` and `[c|x]` views, left-padded to the fixed budgets of `cfg`.

    The context is the record's own non-empty `context`, else `run_context`. `index` is the record's
    position in the source list, carried through so the evaluator can find the verifier fields.
    With a retention `pool` (context texts), also `[c'|x]` for every c' of it: `pool_prompt_ids` and
    `pool_prompt_mask` [K, max_context_prompt_tokens], from which the step draws one per row.
    """
    where = _where(index, record)
    _check_record(record, where)
    context = record.get("context") or run_context
    _, pad_id = eos_and_pad(tokenizer)
    views = {}
    for name, ctx, key in (
        ("prompt", "", "max_prompt_tokens"),
        ("ctx_prompt", context, "max_context_prompt_tokens"),
    ):
        views[f"{name}_ids"], views[f"{name}_mask"] = _render_view(
            tokenizer, ctx, record["prompt"], cfg, key, where, pad_id
        )
    if pool:
        rendered = [
            _render_view(
                tokenizer, c, record["prompt"], cfg, "max_context_prompt_tokens", where, pad_id
            )
            for c in pool
        ]
        views["pool_prompt_ids"] = np.stack([ids for ids, _ in rendered])
        views["pool_prompt_mask"] = np.stack([mask for _, mask in rendered])
    views["index"] = np.int32(index)
    return views


# ----------------------------------------------------------------------------------------------
# The retention anchor's pool of other contexts


def read_context_pool(path: str) -> dict[str, str]:
    """Contexts of a pool file, name -> text. `.jsonl`: one JSON object per non-blank line,
    `{"context": text, "name": optional name}`; any other file: one context
    per non-blank line. A context without a name is named by its text. Errors name file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"retention.pool_file not found: {path}")
    pool: dict[str, str] = {}
    texts: dict[str, str] = {}  # text -> where, to refuse duplicates
    if path.endswith(".jsonl"):
        lines = read_jsonl(path, what="retention.pool_file")
    else:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    for line_no, entry in lines:
        where = f"{path}:{line_no}"
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - {"context", "name"})
            if unknown or not isinstance(entry.get("context"), str):
                raise ValueError(
                    f"{where}: a pool entry is {{'context': str, 'name': str (optional)}}, "
                    f"got keys {sorted(entry)}"
                )
            text, name = entry["context"], entry.get("name", entry["context"])
        elif isinstance(entry, str):
            text, name = entry, entry
        else:
            raise ValueError(f"{where}: a pool entry must be a string or an object")
        if not isinstance(name, str) or not text.strip():
            raise ValueError(f"{where}: empty context or non-string name")
        if name in pool or text in texts:
            raise ValueError(f"{where}: context {name!r} is already in the pool")
        pool[name], texts[text] = text, where
    if not pool:
        raise ValueError(f"retention.pool_file holds no contexts: {path}")
    return pool


def anchor_pool(
    contexts: dict[str, str],
    distilled: str,
    held_out: Sequence[str] = (),
    pool_file: str | None = None,
) -> dict[str, str]:
    """The contexts the retention anchor draws from, name -> text: `pool_file`'s, else the task's
    `contexts` minus the `distilled` one, and minus the `held_out` names (never drawn)."""
    if pool_file:
        candidates = read_context_pool(pool_file)
        if contexts[distilled] in candidates.values():
            raise ValueError(
                f"retention.pool_file {pool_file} holds the distilled context {distilled!r}: "
                "the anchor must never draw it"
            )
    else:
        candidates = {k: v for k, v in contexts.items() if k != distilled}
        if not candidates:
            raise ValueError(
                f"retention.gamma > 0 needs other contexts than the distilled {distilled!r}, and "
                "the task has none: set retention.pool_file"
            )
    unknown = [name for name in held_out if name not in candidates]
    if unknown:
        raise ValueError(
            f"retention.held_out names {unknown}, not in the pool; valid: {sorted(candidates)}"
        )
    pool = {k: v for k, v in candidates.items() if k not in held_out}
    if not pool:
        raise ValueError("retention.held_out holds back the whole pool: nothing left to draw")
    return pool


# ----------------------------------------------------------------------------------------------
# Pipelines


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, records unhashed
class _EncodeRows:
    """Record positions of one global batch -> this process's rows, encoded and stacked; a plain
    picklable object so grain worker processes can run it."""

    records: Sequence[dict[str, Any]]
    tokenizer: Any
    run_context: str
    cfg: DataConfig
    rows: np.ndarray | None  # positions within the global batch this process encodes; None: all
    pool: tuple[str, ...] = ()  # the retention anchor's contexts, rendered for every row

    def __call__(self, indices_B: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices_B) if self.rows is None else np.asarray(indices_B)[self.rows]
        encoded = [
            encode_record(
                self.records[int(i)],
                self.tokenizer,
                self.run_context,
                self.cfg,
                index=int(i),
                pool=self.pool,
            )
            for i in indices
        ]
        return {key: np.stack([e[key] for e in encoded]) for key in encoded[0]}


def check_budgets(
    records: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, pool: Sequence[str] = ()
) -> None:
    """Encodes every record once (with every `pool` context), so a record over its token budget
    fails at start-up with its index and file:line, not thousands of steps into a run when its
    batch comes up."""
    run_context = resolve_context(cfg)
    for index, record in enumerate(records):
        encode_record(record, tokenizer, run_context, cfg, index=index, pool=pool)


def make_iterator(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    cfg: DataConfig,
    *,
    num_epochs: int | None = None,
    rows: Sequence[int] | None = None,
    pool: Sequence[str] = (),
) -> Any:
    """A checkpointable grain iterator of batches `{prompt_ids [B,P], prompt_mask [B,P],
    ctx_prompt_ids [B,Q], ctx_prompt_mask [B,Q], index [B]}` (numpy).

    Pipeline: all records -> seeded shuffle (a new order each epoch) -> repeat `num_epochs` times
    (None: forever) -> global batches of `cfg.batch_size` record positions, remainder dropped ->
    encode. Batches may straddle an epoch boundary. `cfg.batch_size` is the *global* batch: every
    process of a multi-host run iterates the same global order, and `rows` (positions within each
    global batch, `sharding.process_rows`) picks the rows this process feeds to its devices, so B is
    `len(rows)` and only those rows are encoded. The batches, hence the state, do not depend on the
    number of processes: `it.get_state()` from any process, set on a fresh iterator built with the
    same records and `cfg` (any `rows`), resumes with exactly the same global batches. A retention
    `pool` (context texts) adds `pool_prompt_ids` / `pool_prompt_mask` [B, K, Q] (`encode_record`).
    """
    import grain

    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    if not records:
        raise ValueError("no records to iterate over")
    if num_epochs is not None and len(records) * num_epochs < cfg.batch_size:
        raise ValueError(
            f"{len(records)} records x {num_epochs} epochs is less than one batch of "
            f"data.batch_size={cfg.batch_size}"
        )
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= cfg.batch_size:
            raise ValueError(
                f"rows must be positions in [0, data.batch_size={cfg.batch_size}), got {rows}"
            )
    encode = _EncodeRows(records, tokenizer, resolve_context(cfg), cfg, rows, tuple(pool))
    ds = grain.MapDataset.source(range(len(records)))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # before repeat, so each epoch is a fresh permutation
    # Batch the positions first, then encode only this process's rows of each global batch.
    ds = ds.repeat(num_epochs).batch(cfg.batch_size, drop_remainder=True).map(encode)
    # The records are already in memory and encoding holds the GIL, so reader threads would only
    # contend; parallelism, when wanted, comes from worker processes instead.
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if cfg.worker_count > 0:
        from absl import flags

        # grain reads its `--grain_*` absl flags when it starts workers; outside `absl.app.run`
        # nobody parsed them and reading raises, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return iter(iter_ds)
