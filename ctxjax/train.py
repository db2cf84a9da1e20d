"""The training loop around the pure step: set-up, logging, evaluation, checkpoints, summary.

`run(cfg, resume=False)` is everything `python scripts/train.py` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from ctxjax import hf, sharding
from ctxjax.base import build_or_reuse_base
from ctxjax.checkpoint import Checkpointer
from ctxjax.config import RunConfig, to_dict
from ctxjax.data import check_budgets, load_jsonl, make_iterator
from ctxjax.evaluate import evaluate_context
from ctxjax.metrics import SUMMARY_KEYS, markdown_table
from ctxjax.model import ModelConfig, Transformer
from ctxjax.step import (
    StepConfig,
    TrainState,
    init_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
)
from ctxjax.tasks import Task, get_task

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
    task: Task | None  # None for task.name="jsonl": no verifier, no evaluation
    records: list[dict]
    graphdef: nnx.GraphDef
    teacher_graphdef: nnx.GraphDef
    teacher_params: nnx.State
    state: TrainState
    step_fn: StepFn
    data_iter: grain.DatasetIterator
    student_path: str


def run_record(run: Run) -> dict:
    """The run's config as JSON, its `model` section the architecture in force (the student's):
    what config.json, the summary and the checkpoints' architecture check hold."""
    return {**to_dict(run.cfg), "model": to_dict(run.model_cfg)}


def resolve_student(cfg: RunConfig, progress: bool = True) -> str:
    if cfg.student:
        return cfg.student
    return build_or_reuse_base(
        cfg.task.name,
        dict(cfg.task.options),
        cfg.model,
        cfg.base,
        seed=cfg.base.seed,
        progress=progress,
        numerics=cfg.numerics,
    )


def training_records(cfg: RunConfig, task: Task | None) -> list[dict]:
    """Prompts the student answers during OPD: a JSONL file, or the task's training split."""
    if cfg.data.train_file:
        return load_jsonl(cfg.data.train_file)
    if task is None:
        raise ValueError("task.name='jsonl' needs data.train_file")
    n = max(cfg.data.batch_size * cfg.train.steps, 4 * cfg.data.batch_size, 256)
    return task.train_records(cfg.task.context, min(n, 20000), cfg.train.seed)


def load_task(cfg: RunConfig) -> Task | None:
    if cfg.task.name == "jsonl":
        return None
    task = get_task(cfg.task.name, **dict(cfg.task.options))
    if cfg.task.context not in task.contexts():
        raise KeyError(
            f"task.context={cfg.task.context!r} is not a context of task "
            f"{cfg.task.name!r}; valid: {sorted(task.contexts())}"
        )
    return task


def check_batch_fits_mesh(cfg: RunConfig, mesh: jax.sharding.Mesh) -> None:
    divisor = sharding.batch_divisor(mesh) * cfg.train.micro_batches
    if cfg.data.batch_size % divisor:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by "
            f"mesh data*fsdp x train.micro_batches = {divisor}"
        )


class Models(NamedTuple):
    model_cfg: ModelConfig  # the student's architecture, from its config.json
    graphdef: nnx.GraphDef
    params: nnx.State  # sharded over the mesh
    teacher_graphdef: nnx.GraphDef
    teacher_params: nnx.State


def load_models(cfg: RunConfig, student_path: str, mesh: jax.sharding.Mesh) -> Models:
    """Student and teacher split into graphdef and sharded params; `teacher=""` is the frozen
    starting student."""
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
    )
    return jit_train_step(
        make_train_step(graphdef, teacher_graphdef, tx, step_cfg), state_shardings
    )


def build_data(
    cfg: RunConfig, task: Task | None, tokenizer: PreTrainedTokenizerBase, mesh: jax.sharding.Mesh
) -> tuple[list[dict], grain.DatasetIterator]:
    """The training records and the checkpointable iterator over this process's rows of each
    global batch (the same global batches for any number of processes)."""
    records = training_records(cfg, task)
    check_budgets(records, tokenizer, cfg.data)
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + cfg.train.seed)
    rows = sharding.process_rows(mesh, cfg.data.batch_size)
    return records, make_iterator(records, tokenizer, data_cfg, rows=rows)


def setup(cfg: RunConfig, progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> Run:
    sharding.maybe_initialize_distributed()
    mesh = mesh or sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    check_batch_fits_mesh(cfg, mesh)
    task = load_task(cfg)
    student_path = resolve_student(cfg, progress)
    tokenizer = hf.load_tokenizer(cfg.tokenizer or student_path)
    models = load_models(cfg, student_path, mesh)
    tx, state, state_shardings = init_train_state(
        cfg, nnx.merge(models.graphdef, models.params), mesh
    )
    step_fn = build_step(
        cfg, models.graphdef, models.teacher_graphdef, tx, tokenizer, state_shardings
    )
    records, data_iter = build_data(cfg, task, tokenizer, mesh)
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
    )


def evaluate_student(run: Run, params=None, retention: bool = True) -> dict | None:
    if run.task is None:
        return None
    cfg = run.cfg
    model = nnx.merge(run.graphdef, params if params is not None else run.state.params)
    return evaluate_context(
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
    )


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
                # 2: independent random streams per view, k draws per item, undefined -> None
                version=2,
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


class MetricsLog:
    """Progress bar, JSONL file and TensorBoard, fed host-side numbers."""

    def __init__(self, out_dir: str, total: int, start: int, progress: bool):
        os.makedirs(out_dir, exist_ok=True)
        # Open for the whole run (closed by `close`), appended to after every step.
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self.tb = (
                SummaryWriter(os.path.join(out_dir, "tb")) if jax.process_index() == 0 else None
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
        self.jsonl.write(json.dumps(row) + "\n")
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


def train(
    run: Run,
    *,
    resume: bool = False,
    progress: bool = True,
    checkpointer: Checkpointer | None = None,
) -> dict:
    """Runs the loop from step 0 or the latest checkpoint to `train.steps`; returns the summary."""
    cfg = run.cfg
    out_dir = cfg.train.out_dir
    os.makedirs(out_dir, exist_ok=True)
    cfg_dict = run_record(run)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(json.dumps(cfg_dict, indent=2, sort_keys=True))
    ckpt = checkpointer
    if ckpt is None and cfg.train.checkpoint_every:
        ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    start = 0
    if resume:
        if ckpt is None:
            raise ValueError("--resume needs checkpoints (train.checkpoint_every > 0)")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state
        )
        run.state, start = ckpt.restore(abstract, run.data_iter, cfg_dict)
        log.info("resumed from step %d", start)
    summary: dict = {"config": cfg_dict, "student": run.student_path}
    if start == 0 and run.task is not None:
        summary["before"] = evaluate_start(run)
    base_rng = jax.random.key(cfg.train.seed)
    mlog = MetricsLog(out_dir, cfg.train.steps, start, progress)
    pending = None  # metrics of the previous step, fetched one step late to keep dispatch async
    t_last = time.time()
    for step in range(start, cfg.train.steps):
        batch = sharding.place_batch(next(run.data_iter), run.mesh, cfg.data.batch_size)
        run.state, metrics = run.step_fn(
            run.state, run.teacher_params, batch, jax.random.fold_in(base_rng, step)
        )
        if pending is not None:
            _log(mlog, pending, cfg, t_last)
            t_last = time.time()
        pending = (step, metrics)
        mlog.advance()
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            ev = evaluate_student(run, retention=False)
            if ev is not None:
                mlog.write(
                    step + 1,
                    {f"eval/{k}": ev[k] for k in SUMMARY_KEYS if ev.get(k) is not None},
                    show=False,
                )
        if (
            ckpt is not None
            and cfg.train.checkpoint_every
            and ((step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps)
        ):
            ckpt.save(step + 1, run.state, run.data_iter, cfg_dict)
    if pending is not None:
        _log(mlog, pending, cfg, t_last)
    mlog.close()
    if ckpt is not None:
        ckpt.wait()
    if run.task is not None:
        summary["after"] = evaluate_student(run)
    final_dir = os.path.join(out_dir, "final")
    params = sharding.gather_to_host(run.state.params)  # a collective: every process takes part
    if jax.process_index() == 0:
        final = nnx.merge(run.graphdef, params)
        hf.export_pretrained(final, run.tokenizer, final_dir, source=run.student_path)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    summary["final_dir"] = final_dir
    return summary


def _log(mlog: MetricsLog, pending, cfg: RunConfig, t_last: float) -> None:
    step, metrics = pending
    values = jax.device_get(metrics)
    dt = max(time.time() - t_last, 1e-9)
    values["step_time_s"] = dt
    values["tokens_per_s"] = float(values["response_tokens"]) / dt
    mlog.write(step + 1, values, show=(step + 1) % cfg.train.log_every == 0)


def format_summary(summary: dict) -> str:
    """A markdown table of the removability metrics before and after distillation."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    rows = [
        {"": key, "before": before.get(key), "after": after.get(key)}
        for key in SUMMARY_KEYS
        if key in before or key in after
    ]
    return markdown_table(rows, ["", "before", "after"])


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict:
    run_ = setup(cfg, progress=progress)
    summary = train(run_, resume=resume, progress=progress)
    if jax.process_index() == 0:
        print(
            f"\nctxjax: task={cfg.task.name} context={cfg.task.context} "
            f"loss={cfg.loss.opd}+{cfg.loss.beta}*{cfg.loss.consistency} steps={cfg.train.steps}"
        )
        print(format_summary(summary))
        print(f"final model: {summary['final_dir']}")
    return summary
