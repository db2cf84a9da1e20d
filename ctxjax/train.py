"""The training loop around the pure step: set-up, logging, evaluation, checkpoints, summary,
and the guards that never lose a run: divergence stops before anything non-finite is saved,
SIGTERM/SIGINT save and exit, an out_dir holding a run is locked and never silently reused.

`run(cfg, resume=False)` is everything `python scripts/train.py` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from ctxjax import hf, sharding
from ctxjax.base import base_key, build_or_reuse_base
from ctxjax.checkpoint import Checkpointer, CheckpointError
from ctxjax.config import MODEL_SIZES, EvalConfig, RunConfig, to_dict
from ctxjax.data import (
    anchor_pool,
    check_budgets,
    check_has_context,
    load_jsonl,
    make_iterator,
    resolve_context,
)
from ctxjax.evaluate import evaluate_context, retention_split
from ctxjax.host_memory import process_allocator, release_free_memory
from ctxjax.metrics import SUMMARY_KEYS, markdown_table
from ctxjax.model import ModelConfig, Numerics, Transformer
from ctxjax.run_dir import (
    SET_ASIDE,
    Lock,
    RunRefused,
    check_out_dir,
    check_resume_config,
    check_reusable,
    new_aside_dir,
    record_config_change,
    remove_run,
    resolved_path,
    write_atomic,
    write_json_atomic,
)
from ctxjax.step import (
    StepConfig,
    TrainState,
    init_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
)
from ctxjax.tasks import Task, get_task
from ctxjax.tasks.jsonl import JsonlTask
from ctxjax.tasks.verifiers import VerifierError

if TYPE_CHECKING:  # imported lazily at run time: grain and transformers are slow to import
    import grain
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


# One compiled OPD step: (state, teacher params, batch, rng) -> (new state, metrics).
StepFn = Callable[
    [TrainState, nnx.State, dict[str, jax.Array], jax.Array],
    tuple[TrainState, dict[str, jax.Array]],
]


@dataclasses.dataclass
class Run:
    """Everything set up for training: handy for tests and notebooks."""

    cfg: RunConfig
    model_cfg: ModelConfig  # the student's architecture, from its config.json
    mesh: jax.sharding.Mesh
    tokenizer: PreTrainedTokenizerBase
    task: Task
    records: list[dict]
    graphdef: nnx.GraphDef
    teacher_graphdef: nnx.GraphDef
    teacher_params: nnx.State
    state: TrainState
    step_fn: StepFn
    data_iter: grain.DatasetIterator
    student_path: str
    # The retention anchor's contexts, name -> text (`retention_pool`); {} when none is configured.
    anchor_pool: dict[str, str] = dataclasses.field(default_factory=dict)


def run_record(run: Run) -> dict:
    """The run's config as JSON, its `model` section the architecture in force (the student's):
    what config.json, the summary and the checkpoints' architecture check hold."""
    record = {**to_dict(run.cfg), "model": to_dict(run.model_cfg)}
    if run.cfg.student:  # no base model is built: its settings would be leftovers, not facts
        del record["base"]
    return record


def resolve_student(cfg: RunConfig, progress: bool = True) -> str:
    """The student's folder as an absolute path: `student`, or the base model, built if missing."""
    if cfg.student:
        return resolved_path(cfg.student)
    built = build_or_reuse_base(
        cfg.task.name,
        dict(cfg.task.options),
        cfg.model,
        cfg.base,
        seed=cfg.base.seed,
        progress=progress,
        numerics=cfg.numerics,
    )
    return os.path.abspath(built)


def base_folder(cfg: RunConfig) -> str:
    """The folder `resolve_student` gives a run without `student`, computed without building."""
    key = base_key(
        cfg.task.name, dict(cfg.task.options), cfg.model, cfg.base, cfg.base.seed, cfg.numerics
    )
    return os.path.abspath(os.path.join(cfg.base.cache_dir, key))


# `teacher=base:<size>`: the task's own base model at another size of `config.MODEL_SIZES` (built or
# reused like the student's), so a grid can name a cross-size teacher without knowing its folder.
BASE_TEACHER = "base:"


def resolve_teacher(cfg: RunConfig, progress: bool = True, build: bool = True) -> str:
    """The teacher's HF folder as an absolute path ("" stays ""): `cfg.teacher` itself, or the
    `base:<size>` base model's (built if missing, unless `build` is False)."""
    if not cfg.teacher.startswith(BASE_TEACHER):
        return resolved_path(cfg.teacher)
    size = cfg.teacher[len(BASE_TEACHER) :]
    if size not in MODEL_SIZES:
        raise ValueError(
            f"teacher={cfg.teacher}: unknown size {size!r}; valid: {sorted(MODEL_SIZES)}"
        )
    if cfg.student:
        raise ValueError(f"teacher={cfg.teacher} names a built base model; the student must be too")
    model_cfg = dataclasses.replace(cfg.model, **MODEL_SIZES[size])
    teacher_cfg = dataclasses.replace(cfg, model=model_cfg, teacher="")
    return resolve_student(teacher_cfg, progress) if build else base_folder(teacher_cfg)


def planned_record(cfg: RunConfig) -> dict:
    """The run record (`run_record`) as far as it is known before set-up: the model folders
    resolved without building anything; what set-up reads from the student (its architecture)
    or from the records (a JSONL run's context name) left out."""
    resolved = dataclasses.replace(
        cfg,
        student=resolved_path(cfg.student),
        teacher=resolve_teacher(cfg, build=False),
        tokenizer=resolved_path(cfg.tokenizer),
    )
    record = to_dict(resolved)
    if cfg.student:
        del record["base"], record["model"]
    if not cfg.task.context:
        del record["task"]["context"]
    return record


def training_records(cfg: RunConfig, task: Task) -> list[dict]:
    """Prompts the student answers during OPD: the user's train split, or the task's."""
    if isinstance(task, JsonlTask):
        return list(task.train_split)  # the held-out eval prompts never reach training
    if cfg.data.train_file:
        return load_jsonl(cfg.data.train_file)
    n = max(cfg.data.batch_size * cfg.train.steps, 4 * cfg.data.batch_size, 256)
    return task.train_records(cfg.task.context, min(n, 20000), cfg.train.seed)


def load_task(cfg: RunConfig) -> Task:
    if cfg.task.name == "jsonl":
        return load_jsonl_task(cfg)
    return get_task(cfg.task.name, **dict(cfg.task.options))


def load_jsonl_task(cfg: RunConfig) -> JsonlTask:
    """The user's records as a task: `data.train_file`, the eval split (`data.eval_file` or
    `task.options.eval_fraction`) and the verifier (`task.options.verifier` or per record)."""
    if not cfg.student:
        raise ValueError(
            "task.name=jsonl trains on your own records, which give no base model to build: set "
            "student= to the HF folder of the model to distill"
        )
    if not cfg.data.train_file:
        raise ValueError("task.name='jsonl' needs data.train_file")
    valid = ("eval_fraction", "verifier", "context_regime")
    unknown = sorted(set(cfg.task.options) - set(valid))
    if unknown:
        raise ValueError(f"unknown task.options {unknown} for task 'jsonl'; valid: {list(valid)}")
    return JsonlTask(
        train_file=cfg.data.train_file,
        eval_file=cfg.data.eval_file,
        context=resolve_context(cfg.data),
        **dict(cfg.task.options),
    )


def distilled_context(cfg: RunConfig, task: Task) -> str:
    """The name of the context distilled: `task.context`; for a JSONL run left at "", the
    run-level context's name, or the file's only context."""
    if cfg.task.context or not isinstance(task, JsonlTask):
        if cfg.task.context not in task.contexts():
            raise KeyError(
                f"task.context={cfg.task.context!r} is not a context of task "
                f"{cfg.task.name!r}; valid: {sorted(task.contexts())}"
            )
        return cfg.task.context
    run_context = resolve_context(cfg.data)
    if run_context:
        return task.context_name(run_context)
    if len(task.contexts()) != 1:
        raise ValueError(
            f"the records hold {len(task.contexts())} contexts: set task.context to the one "
            f"to evaluate, one of {sorted(task.contexts())}"
        )
    return next(iter(task.contexts()))


def check_batch_fits_mesh(cfg: RunConfig, mesh: jax.sharding.Mesh) -> None:
    divisor = sharding.batch_divisor(mesh) * cfg.train.micro_batches
    if cfg.data.batch_size % divisor:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by "
            f"mesh data*fsdp x train.micro_batches = {divisor}"
        )


# From this many parameters on, an unrolled fp32 step's XLA temporaries dominate the memory: every
# layer's activations and both student passes' weight gradients are alive at once (docs/memory.md).
# Scanned, rematerialized layers are not the default: they round differently, and an existing run
# must keep its numbers.
LARGE_MODEL_PARAMS = 50_000_000


def warn_step_memory(numerics: Numerics, model_cfg: ModelConfig) -> None:
    """A warning, naming the settings, when a large model runs its step unrolled."""
    if numerics.scan_layers and numerics.remat:
        return
    n = model_cfg.num_params()
    if n >= LARGE_MODEL_PARAMS:
        log.warning(
            "a %.0fM-parameter student with numerics.scan_layers=%s numerics.remat=%s: the "
            "compiled step holds every layer's activations and gradients at once (SmolLM2-135M, "
            "batch 8: 3.6 GiB of XLA temporaries); numerics.scan_layers=true numerics.remat=true "
            "needs 1.0 GiB (configs/smollm2_cpu.yaml) and rounds differently",
            n / 1e6,
            str(numerics.scan_layers).lower(),
            str(numerics.remat).lower(),
        )


class Models(NamedTuple):
    model_cfg: ModelConfig  # the student's architecture, from its config.json
    graphdef: nnx.GraphDef
    params: nnx.State  # sharded over the mesh
    teacher_graphdef: nnx.GraphDef
    teacher_params: nnx.State


def load_models(
    cfg: RunConfig,
    student_path: str,
    mesh: jax.sharding.Mesh,
    tokenizer: PreTrainedTokenizerBase,
) -> Models:
    """Student and teacher split into graphdef and sharded params; `teacher=""` is the frozen
    starting student. A teacher must share the student's tokenizer, and no model may have fewer
    embeddings than the tokenizer has tokens (the clamped gather would train on wrong rows)."""
    # The checks read config.json and the tokenizers only: they fail before any weight is read.
    architecture = hf.read_architecture(student_path)
    hf.check_vocab(tokenizer, architecture, f"student {student_path}")
    warn_step_memory(cfg.numerics, architecture)
    if cfg.teacher:
        hf.check_vocab(tokenizer, hf.read_architecture(cfg.teacher), f"teacher {cfg.teacher}")
        try:
            hf.check_same_tokenizer(tokenizer, hf.load_tokenizer(cfg.teacher))
        except ValueError as e:
            raise ValueError(f"teacher {cfg.teacher} vs student {student_path}: {e}") from None
    student = hf.load_model(student_path, cfg.numerics)
    graphdef, params = nnx.split(student, nnx.Param)
    params = sharding.shard_params(params, mesh)
    if not cfg.teacher:  # a real copy, since the student's buffers get donated
        return Models(
            student.cfg, graphdef, params, graphdef, jax.tree.map(lambda x: x.copy(), params)
        )
    teacher = hf.load_model(cfg.teacher, cfg.numerics)
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise ValueError(
            f"teacher {cfg.teacher} has vocab {teacher.cfg.vocab_size}, student "
            f"{student_path} has {student.cfg.vocab_size}: they must share a tokenizer"
        )
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    teacher_params = sharding.shard_params(teacher_params, mesh)
    return Models(student.cfg, graphdef, params, teacher_graphdef, teacher_params)


def init_train_state(
    cfg: RunConfig, model: Transformer, mesh: jax.sharding.Mesh
) -> tuple[optax.GradientTransformation, TrainState, TrainState]:
    """The optimizer, the train state placed on the mesh, and its shardings (a TrainState of
    NamedSharding leaves).

    Optimizer moments follow their parameter's layout (same path suffix); scalars are replicated.
    Placing the whole state once keeps the step's input and output shardings equal: one compile.
    """
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(model, tx)[1]
    state_shardings = sharding.param_shardings(state, mesh)
    return tx, jax.device_put(state, state_shardings), state_shardings


def retention_pool(cfg: RunConfig, task: Task) -> dict[str, str]:
    """The anchor's pool (`data.anchor_pool`) when the anchor is on or a pool/held-out part is set
    (then the baseline's retention report is split the same way); else {}."""
    r = cfg.retention
    if not (r.enabled or r.pool_file or r.held_out):
        return {}
    return anchor_pool(task.contexts(), cfg.task.context, r.held_out, r.pool_file)


def build_step(
    cfg: RunConfig,
    graphdef: nnx.GraphDef,
    teacher_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    tokenizer: PreTrainedTokenizerBase,
    state_shardings: TrainState,
) -> StepFn:
    eos_ids, pad_id = hf.eos_and_pad(tokenizer)
    step_cfg = StepConfig(
        loss=cfg.loss,
        optim=cfg.optim,
        rollout=cfg.rollout,
        total_steps=cfg.train.steps,
        micro_batches=cfg.train.micro_batches,
        eos_ids=eos_ids,
        pad_id=pad_id,
        retention=cfg.retention,
    )
    return jit_train_step(
        make_train_step(graphdef, teacher_graphdef, tx, step_cfg), state_shardings
    )


def build_data(
    cfg: RunConfig,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    mesh: jax.sharding.Mesh,
    pool: dict[str, str] | None = None,
) -> tuple[list[dict], grain.DatasetIterator]:
    """The training records and the checkpointable iterator over this process's rows of each
    global batch (the same global batches for any number of processes). With the retention anchor
    on, every row also carries its `[c'|x]` view for each context of `pool`."""
    records = training_records(cfg, task)
    check_has_context(records, resolve_context(cfg.data))
    texts = tuple(pool.values()) if pool and cfg.retention.enabled else ()
    check_budgets(records, tokenizer, cfg.data, pool=texts)
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + cfg.train.seed)
    rows = sharding.process_rows(mesh, cfg.data.batch_size)
    return records, make_iterator(records, tokenizer, data_cfg, rows=rows, pool=texts)


def check_model_paths(cfg: RunConfig) -> None:
    """The model folders the user named, before anything reads them (a wrong `student` would
    otherwise surface as a missing tokenizer folder)."""
    for key in ("student", "teacher"):
        path = getattr(cfg, key)
        if path and not path.startswith(BASE_TEACHER):
            hf.check_model_folder(path, key)


def setup(cfg: RunConfig, progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> Run:
    check_model_paths(cfg)
    sharding.maybe_initialize_distributed()
    mesh = mesh or sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    check_batch_fits_mesh(cfg, mesh)
    task = load_task(cfg)
    check_evaluation_settings(cfg, task)
    # A JSONL run's context name is resolved here, so config.json records the one evaluated.
    cfg = dataclasses.replace(
        cfg, task=dataclasses.replace(cfg.task, context=distilled_context(cfg, task))
    )
    student_path = resolve_student(cfg, progress)
    # Folders recorded resolved: a resume from another directory names the same models.
    cfg = dataclasses.replace(
        cfg, student=cfg.student and student_path, tokenizer=resolved_path(cfg.tokenizer)
    )
    tokenizer = hf.load_tokenizer(cfg.tokenizer or student_path)
    # Records and their token budgets first: a bad record fails in seconds, before the weights load.
    pool = retention_pool(cfg, task)
    records, data_iter = build_data(cfg, task, tokenizer, mesh, pool)
    cfg = dataclasses.replace(cfg, teacher=resolve_teacher(cfg, progress))
    models = load_models(cfg, student_path, mesh, tokenizer)
    tx, state, state_shardings = init_train_state(
        cfg, nnx.merge(models.graphdef, models.params), mesh
    )
    step_fn = build_step(
        cfg, models.graphdef, models.teacher_graphdef, tx, tokenizer, state_shardings
    )
    release_free_memory()  # the checkpoint's host copies and the tokenizer's scratch
    return Run(
        cfg=cfg,
        model_cfg=models.model_cfg,
        mesh=mesh,
        tokenizer=tokenizer,
        task=task,
        records=records,
        graphdef=models.graphdef,
        teacher_graphdef=models.teacher_graphdef,
        teacher_params=models.teacher_params,
        state=state,
        step_fn=step_fn,
        data_iter=data_iter,
        student_path=student_path,
        anchor_pool=pool,
    )


def evaluable(task: Task) -> bool:
    """False only for a JSONL run without an eval split (no eval_file, no eval_fraction)."""
    return not isinstance(task, JsonlTask) or bool(task.eval_split)


def check_evaluation_settings(cfg: RunConfig, task: Task) -> None:
    """Evaluation settings on a run that evaluates nothing are an error, not silently unused."""
    if evaluable(task):
        return
    keys = ["train.eval_every"] if cfg.train.eval_every else []
    keys += [f"eval.{k}" for k, v in vars(cfg.eval).items() if getattr(EvalConfig(), k) != v]
    if keys:
        raise ValueError(
            f"{', '.join(keys)} would be ignored: this jsonl run has no eval split "
            "(set data.eval_file or task.options.eval_fraction, and task.options.verifier)"
        )


def evaluate_student(run: Run, params=None, retention: bool = True) -> dict | None:
    if not evaluable(run.task):
        return None
    cfg = run.cfg
    model = nnx.merge(run.graphdef, params if params is not None else run.state.params)
    result = evaluate_context(
        model,
        run.tokenizer,
        run.task,
        cfg.task.context,
        examples=cfg.eval.examples,
        max_new_tokens=cfg.eval.max_new_tokens,
        temperature=cfg.eval.temperature,
        samples=cfg.eval.samples,
        coupled_views=cfg.eval.coupled_views,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        retention=retention,
        placement=cfg.data.context_placement,
    )
    release_free_memory()  # the evaluation's buffers, before training allocates its own
    return result


def evaluate_start(run: Run) -> dict | None:
    """The starting student's evaluation, cached beside it: runs that share a base model (OPD vs
    NCA, seeds) share this number instead of recomputing it. The key holds everything it depends
    on, `version` included: bump it whenever the evaluation's numbers change."""
    cfg = run.cfg
    if cfg.student:  # only the built base models carry a cache; a user's checkpoint stays untouched
        return evaluate_student(run)
    key = hashlib.sha256(
        json.dumps(
            dict(
                task=cfg.task.name,
                options=cfg.task.options,
                context=cfg.task.context,
                eval=dataclasses.asdict(cfg.eval),
                # 2: independent random streams per view, k draws per item, undefined -> None;
                # 3: a second no-context draw under sampling (Harm's floor)
                version=3,
            ),
            sort_keys=True,
            default=list,
        ).encode()
    )
    path = os.path.join(run.student_path, "ctxjax_eval", key.hexdigest()[:16] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = evaluate_student(run)
    try:  # a read-only student folder just means no cache
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, default=float)
    except OSError:
        pass
    return result


def _set_rows_aside(out_dir: str, start: int, aside_dir: str | None) -> None:
    """Keeps the rows of metrics.jsonl up to step `start` (what a resume replays is logged once);
    the rows past it, and a torn last line (a crash mid-write), move to `metrics.jsonl` in the
    resume's set-aside folder (`aside_dir`, or a new one), never dropped."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept, moved = [], []
    with open(path) as f:
        for line in f:
            line = line if line.endswith("\n") else line + "\n"
            try:
                keep = json.loads(line).get("step", 0) <= start
            except (ValueError, AttributeError):
                keep = False
            (kept if keep else moved).append(line)
    if not moved:
        return
    aside_dir = aside_dir or new_aside_dir(os.path.join(out_dir, SET_ASIDE), start)
    # Written aside first: a crash in between leaves a row twice, never nowhere.
    write_atomic(os.path.join(aside_dir, "metrics.jsonl"), "".join(moved))
    write_atomic(path, "".join(kept))
    log.warning("moved %d metric rows past step %d aside to %s", len(moved), start, aside_dir)


class MetricsLog:
    """Progress bar, JSONL file and TensorBoard, fed host-side numbers."""

    def __init__(
        self, out_dir: str, total: int, start: int, progress: bool, aside_dir: str | None = None
    ):
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        if jax.process_index() == 0:
            # A resumed run replays the steps after its checkpoint.
            _set_rows_aside(out_dir, start, aside_dir)
        # Open for the whole run (closed by `close`), appended to after every step.
        self.jsonl = open(path, "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the events a resumed run writes again.
            self.tb = (
                SummaryWriter(os.path.join(out_dir, "tb"), purge_step=start + 1)
                if jax.process_index() == 0
                else None
            )
        except ImportError:  # tensorboardX is in requirements.txt; keep training without it
            self.tb = None
        self.bar = None
        if progress and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="OPD", mininterval=1.0)

    def write(self, step: int, values: dict, show: bool) -> None:
        if jax.process_index() != 0:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items() if np.ndim(v) == 0}}
        self.jsonl.write(json.dumps(row) + "\n")  # NaN/inf as NaN/Infinity, never 0
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and show:
            self.bar.set_postfix(
                {
                    k: f"{row[k]:.3g}"
                    for k in ("loss", "l_opd", "l_consistency", "response_len")
                    if k in row
                }
            )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


class Diverged(RuntimeError):
    """A step produced NaN/inf; the message names the step, the terms and how to resume."""


# The step's divergence flags and what each one means in a message.
NONFINITE_TERMS = {
    "nonfinite_loss": "the loss",
    "nonfinite_grads": "the gradients",
    "nonfinite_params": "the parameters after the update",
}


class StopSignal:
    """While active, SIGTERM/SIGINT only ask the loop to stop after the current step (it then
    saves a checkpoint); a second SIGINT stops at once. Off the main thread it does nothing
    (Python delivers signals to the main thread only)."""

    def __init__(self):
        self.name: str | None = None
        self._previous: dict = {}
        # What a signal lets finish first (the loop sets it when it moves on to the final part).
        self.finishing = "the current step, then saving a checkpoint"

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        log.warning("%s: finishing %s (SIGINT again: stop now)", self.name, self.finishing)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    run: Run,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    resume_step: int | None = None,
    unverified: bool = False,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
) -> dict:
    """Runs the loop from step 0 or a checkpoint to `train.steps`; returns the summary.

    `resume`: continue the run in out_dir (from step 0 if it has no checkpoint yet);
    `resume_step`: from that checkpoint (implies `resume`), `unverified`: even without its
    checksum manifest (the run stopped before sealing it); `overwrite`: replace the run in
    out_dir (its files are removed once this run holds the lock). An out_dir holding a run is
    refused otherwise. A stop by signal returns the summary with `interrupted` set (no final/).
    """
    resume = resume or resume_step is not None
    out_dir = run.cfg.train.out_dir
    check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    check_reusable(out_dir, resume=resume, overwrite=overwrite)
    lock = Lock(out_dir, take_stale=resume)
    if jax.process_index() == 0:
        lock.acquire()
    try:
        if overwrite and jax.process_index() == 0:
            remove_run(out_dir)
        with StopSignal() as stop:
            return _train(
                run,
                resume,
                allow_config_change,
                resume_step,
                unverified,
                progress,
                checkpointer,
                stop,
            )
    finally:
        lock.release()


def _train(
    run: Run,
    resume: bool,
    allow_config_change: bool,
    resume_step: int | None,
    unverified: bool,
    progress: bool,
    checkpointer: Checkpointer | None,
    stop: StopSignal,
) -> dict:
    cfg = run.cfg
    out_dir = cfg.train.out_dir
    cfg_dict = run_record(run)
    config_path = os.path.join(out_dir, "config.json")
    changes = {}
    if resume and os.path.exists(config_path):  # refused before anything is touched
        changes = check_resume_config(
            out_dir, cfg_dict, allow_change=allow_config_change, defaults=to_dict(RunConfig())
        )
    ckpt = checkpointer
    if ckpt is None and (cfg.train.checkpoint_every or resume):
        ckpt = _checkpointer(cfg)
    summary_path = os.path.join(out_dir, "summary.json")
    summary: dict = {
        "config": cfg_dict,
        "student": run.student_path,
        # The text itself, not only a name or a file path: what the student was taught to do
        # without.
        "context_text": run.task.contexts()[cfg.task.context],
        # The host's malloc: it sets a CPU run's peak memory (docs/memory.md).
        "host_allocator": process_allocator(),
    }
    if summary["host_allocator"] == "mimalloc":
        log.info(
            "host allocator: mimalloc (faster steps, more resident memory; "
            "CTXJAX_ALLOCATOR=system keeps glibc's malloc)"
        )
    if evaluable(run.task):  # the starting student's numbers, before a restore replaces it
        summary["before"] = (_saved_before(summary_path) if resume else None) or evaluate_start(run)
        _split_retention(run, summary["before"])
    start = _restore(run, ckpt, cfg_dict, resume_step, unverified) if resume else 0
    if jax.process_index() == 0:
        record_config_change(out_dir, start, changes)
        if not os.path.exists(config_path):
            write_json_atomic(config_path, cfg_dict)
        write_json_atomic(summary_path, summary)
    base_rng = jax.random.key(cfg.train.seed)
    aside_dir = ckpt.aside_dir if ckpt is not None else None
    mlog = MetricsLog(out_dir, cfg.train.steps, start, progress, aside_dir)
    pending = None  # metrics of the previous step, fetched one step late to keep dispatch async
    t_last = time.time()
    step = start - 1
    try:
        for step in range(start, cfg.train.steps):
            batch = sharding.place_batch(next(run.data_iter), run.mesh, cfg.data.batch_size)
            rng = jax.random.fold_in(base_rng, step)
            if step == start:
                run.step_fn = _compiled(run.step_fn, run.state, run.teacher_params, batch, rng)
            run.state, metrics = run.step_fn(run.state, run.teacher_params, batch, rng)
            if pending is not None:
                _log(mlog, pending, cfg, t_last)
                t_last = time.time()
                # The previous step is done: what it (and the first step's compile) freed goes
                # back to the OS instead of staying in the heap beside the next step's buffers.
                release_free_memory()
            pending = (step, metrics)
            mlog.advance()
            if ckpt is not None:
                ckpt.seal_pending()  # the last save, written beside this step, sealed now
            evaluate = cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0
            every = cfg.train.checkpoint_every
            save = stop.name or (every and ((step + 1) % every == 0 or step + 1 == cfg.train.steps))
            if save and ckpt is None:  # a signal with checkpoints off still saves this step
                ckpt = _checkpointer(cfg)
            if evaluate or save:  # sync points anyway: check this step is finite first
                _log(mlog, pending, cfg, t_last)
                pending, t_last = None, time.time()
            if evaluate:
                ev = evaluate_student(run, retention=False)
                if ev is not None:
                    mlog.write(
                        step + 1,
                        {f"eval/{k}": ev[k] for k in SUMMARY_KEYS if ev.get(k) is not None},
                        show=False,
                    )
            if save:
                ckpt.save(step + 1, run.state, run.data_iter, cfg_dict)
                release_free_memory()
            if stop.name:
                break
        if pending is not None:
            _log(mlog, pending, cfg, t_last)
    except Diverged as e:
        raise Diverged(_diverged_message(str(e), ckpt, out_dir)) from None
    finally:
        mlog.close()
        if ckpt is not None:
            ckpt.wait()  # seals (checksums) every finished save, also on the way out of an error
    if stop.name and step + 1 < cfg.train.steps:
        summary["interrupted"] = {"signal": stop.name, "step": step + 1}
        if jax.process_index() == 0:
            print(
                f"\n{stop.name}: stopped after step {step + 1}, checkpoint saved in "
                f"{ckpt.step_dir(step + 1)}; continue with the same command and --resume"
            )
        return summary
    stop.finishing = "the final evaluation and the export of final/"
    if evaluable(run.task):
        summary["after"] = _split_retention(run, evaluate_student(run))
    final_dir = os.path.join(out_dir, "final")
    params = sharding.gather_to_host(run.state.params)  # a collective: every process takes part
    if jax.process_index() == 0:
        final = nnx.merge(run.graphdef, params)
        hf.export_pretrained(final, run.tokenizer, final_dir, source=run.student_path)
        write_json_atomic(summary_path, summary)
    summary["final_dir"] = final_dir
    return summary


def _compiled(step_fn, state, teacher_params, batch, rng):
    """The jitted step compiled ahead of its first call, and the compiler's freed memory returned
    before that call allocates the step's buffers: compiled lazily, the first step ran beside
    what the compile had left in the heap, and set the run's peak. Anything else (a wrapped step
    in tests) is returned as it is."""
    if not hasattr(step_fn, "lower"):
        return step_fn
    compiled = step_fn.lower(state, teacher_params, batch, rng).compile()
    release_free_memory()
    return compiled


def _split_retention(run: Run, result: dict | None) -> dict | None:
    """Adds `retention_pool` / `retention_held_out` to an evaluation when the run has a pool."""
    if result is not None and run.anchor_pool and result.get("retention") is not None:
        pool = run.anchor_pool.values()
        result.update(retention_split(result["retention"], run.task.contexts(), pool))
    return result


def _checkpointer(cfg: RunConfig) -> Checkpointer:
    return Checkpointer(
        os.path.join(cfg.train.out_dir, "checkpoints"),
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoint,
    )


def _saved_before(summary_path: str) -> dict | None:
    """The `before` section an earlier part of this run wrote (a resumed run keeps it)."""
    try:
        with open(summary_path) as f:
            return json.load(f).get("before")
    except (OSError, ValueError, AttributeError):
        return None


def _restore(
    run: Run,
    ckpt: Checkpointer | None,
    cfg_dict: dict,
    resume_step: int | None,
    unverified: bool = False,
) -> int:
    """Restores run.state and run.data_iter from the newest intact (or the chosen) checkpoint;
    returns its step, 0 when there is none yet."""
    if ckpt is None:
        raise RunRefused("--resume needs checkpoints (train.checkpoint_every > 0)")
    if resume_step is None and not ckpt.manager.all_steps():
        log.info("--resume: no checkpoint in %s yet, starting from step 0", ckpt.directory)
        return 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state
    )
    try:
        run.state, start = ckpt.restore(
            abstract, run.data_iter, cfg_dict, step=resume_step, unverified=unverified
        )
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    log.info("resumed from step %d (%s)", start, ckpt.step_dir(start))
    return start


def _diverged_message(what: str, ckpt: Checkpointer | None, out_dir: str) -> str:
    last = ckpt.manager.latest_step() if ckpt is not None else None
    if last is None:
        keep = "no checkpoint was saved"
    else:
        keep = (
            f"the last good checkpoint is {ckpt.step_dir(last)}; continue from it with a lower "
            f"learning rate: the same command with --resume --allow-config-change "
            f"optim.learning_rate=<lower>"
        )
    return f"{what}; stopped, nothing non-finite saved, no final/ written in {out_dir}; {keep}"


def _log(mlog: MetricsLog, pending, cfg: RunConfig, t_last: float) -> None:
    step, metrics = pending
    values = jax.device_get(metrics)
    dt = max(time.time() - t_last, 1e-9)
    values["step_time_s"] = dt
    values["tokens_per_s"] = float(values["response_tokens"]) / dt
    mlog.write(step + 1, values, show=(step + 1) % cfg.train.log_every == 0)
    bad = [term for key, term in NONFINITE_TERMS.items() if values.get(key)]
    if bad:
        raise Diverged(f"step {step + 1}: non-finite {', '.join(bad)} (NaN/inf)")


def format_summary(summary: dict) -> str:
    """A markdown table of the removability metrics before and after distillation."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    rows = [
        {"": key, "before": before.get(key), "after": after.get(key)}
        for key in SUMMARY_KEYS
        if key in before or key in after
    ]
    return markdown_table(rows, ["", "before", "after"])


def _shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_config_change: bool = False,
    resume_step: int | None = None,
    unverified: bool = False,
    progress: bool = True,
) -> dict:
    """Set-up and training. Bad input is a one-line `RunRefused`; divergence is `Diverged`."""
    # Refused before the slow set-up; `train` checks again once it holds the lock.
    resume = resume or resume_step is not None
    if unverified and resume_step is None:
        raise RunRefused("--unverified restores one chosen step: add --resume-step N")
    check_out_dir(cfg.train.out_dir)
    check_reusable(cfg.train.out_dir, resume=resume, overwrite=overwrite)
    Lock(cfg.train.out_dir, take_stale=resume).check_free()
    try:
        if resume and os.path.exists(os.path.join(cfg.train.out_dir, "config.json")):
            # Before any base-model build or compile; `train` compares the whole record after.
            check_resume_config(
                cfg.train.out_dir,
                planned_record(cfg),
                allow_change=allow_config_change,
                defaults=to_dict(RunConfig()),
            )
        run_ = setup(cfg, progress=progress)
    except (KeyError, ValueError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise RunRefused(" ".join(str(message).split())) from e
    try:
        summary = train(
            run_,
            resume=resume,
            overwrite=overwrite,
            allow_config_change=allow_config_change,
            resume_step=resume_step,
            unverified=unverified,
            progress=progress,
        )
    except VerifierError as e:  # the user's verifier on a record: bad input, named
        raise RunRefused(str(e)) from e
    if jax.process_index() == 0 and "interrupted" not in summary:
        cfg = run_.cfg  # with the context name resolved
        print(
            f"\nctxjax: task={cfg.task.name} context={cfg.task.context} "
            f"({_shorten(summary['context_text'])}) "
            f"loss={cfg.loss.opd}+{cfg.loss.beta}*{cfg.loss.consistency} steps={cfg.train.steps}"
        )
        print(format_summary(summary))
        print(f"final model: {summary['final_dir']}")
    return summary
