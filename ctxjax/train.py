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
from typing import Any

import jax
import numpy as np
from flax import nnx

from ctxjax import hf, sharding
from ctxjax.base import build_or_reuse_base
from ctxjax.checkpoint import Checkpointer, config_dict
from ctxjax.config import RunConfig, to_json
from ctxjax.data import check_budgets, load_jsonl, make_iterator
from ctxjax.evaluate import evaluate_context
from ctxjax.metrics import SUMMARY_KEYS, markdown_table
from ctxjax.step import StepConfig, init_state, jit_train_step, make_optimizer, make_train_step
from ctxjax.tasks import get_task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything set up for training: handy for tests and notebooks."""

    cfg: RunConfig
    mesh: Any
    tokenizer: Any
    task: Any
    records: list[dict]
    graphdef: Any
    teacher_graphdef: Any
    teacher_params: Any
    state: Any
    step_fn: Any
    data_iter: Any
    student_path: str


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
    )


def training_records(cfg: RunConfig, task: Any) -> list[dict]:
    """Prompts the student answers during OPD: a JSONL file, or the task's training split."""
    if cfg.data.train_file:
        return load_jsonl(cfg.data.train_file)
    if task is None:
        raise ValueError("task.name='jsonl' needs data.train_file")
    n = max(cfg.data.batch_size * cfg.train.steps, 4 * cfg.data.batch_size, 256)
    return task.train_records(cfg.task.context, min(n, 20000), cfg.train.seed)


def load_task(cfg: RunConfig):
    if cfg.task.name == "jsonl":
        return None
    task = get_task(cfg.task.name, **dict(cfg.task.options))
    if cfg.task.context not in task.contexts():
        raise KeyError(
            f"task.context={cfg.task.context!r} is not a context of task "
            f"{cfg.task.name!r}; valid: {sorted(task.contexts())}"
        )
    return task


def setup(cfg: RunConfig, progress: bool = True, mesh=None) -> Run:
    sharding.maybe_initialize_distributed()
    mesh = mesh or sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    divisor = sharding.batch_divisor(mesh) * cfg.train.micro_batches
    if cfg.data.batch_size % divisor:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by "
            f"mesh data*fsdp x train.micro_batches = {divisor}"
        )
    task = load_task(cfg)
    student_path = resolve_student(cfg, progress)
    tokenizer = hf.load_tokenizer(cfg.tokenizer or student_path)
    eos_ids, pad_id = hf.eos_and_pad(tokenizer)
    dtype = dict(param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype)
    student = hf.load_model(student_path, **dtype)
    # `model` describes the base model to build; a loaded student has its own architecture. Record
    # the real one, so config.json, the summary and the checkpoints' architecture check see it.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(student.cfg, remat=cfg.model.remat))
    # The blocks read `cfg.remat` when called, so switching it needs no rebuilt module.
    student.cfg = cfg.model
    graphdef, params = nnx.split(student, nnx.Param)
    params = sharding.shard_params(params, mesh)
    if cfg.teacher:
        teacher = hf.load_model(cfg.teacher, **dtype)
        if teacher.cfg.vocab_size != student.cfg.vocab_size:
            raise ValueError(
                f"teacher {cfg.teacher} has vocab {teacher.cfg.vocab_size}, student "
                f"{student_path} has {student.cfg.vocab_size}: they must share a tokenizer"
            )
        teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
        teacher_params = sharding.shard_params(teacher_params, mesh)
    else:  # the frozen starting student; a real copy, since the student's buffers get donated
        teacher_graphdef = graphdef
        teacher_params = jax.tree.map(lambda x: x.copy(), params)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(nnx.merge(graphdef, params), tx)[1]
    # Optimizer moments follow their parameter's layout (same path suffix); scalars are replicated.
    # Placing the whole state once keeps the step's input and output shardings equal: one compile.
    state_shardings = sharding.param_shardings(state, mesh)
    state = jax.device_put(state, state_shardings)
    step_cfg = StepConfig(
        loss=cfg.loss,
        optim=cfg.optim,
        rollout=cfg.rollout,
        total_steps=cfg.train.steps,
        micro_batches=cfg.train.micro_batches,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    step_fn = jit_train_step(
        make_train_step(graphdef, teacher_graphdef, tx, step_cfg), state_shardings
    )
    records = training_records(cfg, task)
    check_budgets(records, tokenizer, cfg.data)
    data_cfg = dataclasses.replace(cfg.data, seed=cfg.data.seed + cfg.train.seed)
    data_iter = make_iterator(
        records,
        tokenizer,
        data_cfg,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    return Run(
        cfg=cfg,
        mesh=mesh,
        tokenizer=tokenizer,
        task=task,
        records=records,
        graphdef=graphdef,
        teacher_graphdef=teacher_graphdef,
        teacher_params=teacher_params,
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
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        retention=retention,
    )


def evaluate_start(run: Run) -> dict | None:
    """The starting student's evaluation, cached beside it: runs that share a base model (OPD vs
    NCA, seeds) share this number instead of recomputing it. The key holds everything it depends on."""
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
                version=1,
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
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
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
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(to_json(cfg))
    ckpt = checkpointer
    if ckpt is None and cfg.train.checkpoint_every:
        ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=cfg.train.keep_checkpoints)
    cfg_dict = config_dict(cfg)
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
    t_last, tokens = time.time(), 0
    for step in range(start, cfg.train.steps):
        batch = sharding.place_batch(next(run.data_iter), run.mesh)
        run.state, metrics = run.step_fn(
            run.state, run.teacher_params, batch, jax.random.fold_in(base_rng, step)
        )
        if pending is not None:
            tokens = _log(mlog, pending, cfg, t_last, tokens)
            t_last = time.time()
        pending = (step, metrics)
        mlog.advance()
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            ev = evaluate_student(run, retention=False)
            if ev is not None:
                mlog.write(
                    step + 1, {f"eval/{k}": ev[k] for k in SUMMARY_KEYS if k in ev}, show=False
                )
        if (
            ckpt is not None
            and cfg.train.checkpoint_every
            and ((step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps)
        ):
            ckpt.save(step + 1, run.state, run.data_iter, cfg_dict)
    if pending is not None:
        _log(mlog, pending, cfg, t_last, tokens)
    mlog.close()
    if ckpt is not None:
        ckpt.wait()
    if run.task is not None:
        summary["after"] = evaluate_student(run)
    final_dir = os.path.join(out_dir, "final")
    if jax.process_index() == 0:
        final = nnx.merge(run.graphdef, run.state.params)
        hf.export_pretrained(final, run.tokenizer, final_dir, source=run.student_path)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=float)
    summary["final_dir"] = final_dir
    return summary


def _log(mlog: MetricsLog, pending, cfg: RunConfig, t_last: float, tokens: int) -> int:
    step, metrics = pending
    values = jax.device_get(metrics)
    dt = max(time.time() - t_last, 1e-9)
    values["step_time_s"] = dt
    values["tokens_per_s"] = float(values["response_tokens"]) / dt
    mlog.write(step + 1, values, show=(step + 1) % cfg.train.log_every == 0)
    return tokens + int(values["response_tokens"])


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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
