"""One typed, frozen config tree for a run; YAML presets and dotted command-line overrides.

`load_config("configs/x.yaml", ["loss.beta=0.1", "model.num_layers=4"])` builds a `RunConfig`.
Every key is checked against the dataclass fields: an unknown or mistyped key is an error that names
the valid keys at that level, and a value of the wrong type is an error that names the key. A
setting the run would ignore (an architecture with `student=`; evaluation settings on a JSONL run
without an eval split, checked at set-up in `ctxjax.train`) is an error too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import types
import typing
from typing import Any

import yaml

from ctxjax import losses
from ctxjax.data import DataConfig
from ctxjax.model import DEFAULT_NUMERICS, ModelConfig, Numerics
from ctxjax.tasks import synthetic

log = logging.getLogger(__name__)

# The valid names are the loss registry's (ctxjax.losses), the one place that defines them.
OPD_LOSSES = tuple(losses.OPD_LOSSES)
CONSISTENCY_LOSSES = tuple(losses.CONSISTENCY_LOSSES)
WEIGHT_SCHEDULES = ("constant", "delayed", "linear")
# "adaptive": NCA's start rule tied to internalization (`ctxjax.step.start_rule`); beta only.
BETA_SCHEDULES = (*WEIGHT_SCHEDULES, "adaptive")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _check_range(key: str, value, minimum) -> None:
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")


def _check_schedule(
    weight_key: str, schedule: str, ramp_steps: int, choices: tuple[str, ...] = WEIGHT_SCHEDULES
) -> None:
    """A weight's schedule (`step.scheduled_weight`): a known kind; "linear" needs a ramp."""
    _check_choice(f"{weight_key}_schedule", schedule, choices)
    if schedule == "linear" and ramp_steps == 0:
        raise ValueError(f"{weight_key}_schedule='linear' needs {weight_key}_ramp_steps >= 1")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """L = L_OPD + beta(step) * L_consistency, per response token, masked mean.

    `beta_schedule` says when the consistency term is on: "constant" (from step 0), "delayed"
    (from `beta_start_step`), "linear" (a ramp of `beta_ramp_steps` from `beta_start_step`), or
    "adaptive", a start rule tied to internalization instead of a step picked by hand: each step
    updates an exponential moving average (decay `beta_kl_ema`, started at step 0's value) of the
    student's no-context reverse KL to the teacher on that step's rollout, which the step computes
    anyway; once it falls below `beta_start_kl` the weight is `beta` from the next step on, latched
    in the train state (never switched off, kept by checkpoints). Before it fires the step is
    exactly plain OPD (the with-context pass is not run).
    """

    opd: str = "reverse_kl_topk"
    top_k: int = 256  # student's top-k, renormalized (the published default)
    jsd_beta: float = 0.5  # only for opd="jsd"
    consistency: str = "nca"  # "nca" | "dual_opd" | "sym_kl"
    beta: float = 0.5  # 0 turns the consistency term (and its forward pass) off: plain OPD
    beta_schedule: str = "constant"  # "constant" | "delayed" (0 before start) | "linear" (ramp)
    beta_start_step: int = 0  # "delayed"/"linear": first step with a non-zero beta
    beta_ramp_steps: int = 0  # "linear": steps from 0 to beta after beta_start_step
    beta_start_kl: float = 0.0  # "adaptive": switch on once the KL's moving average is below this
    beta_kl_ema: float = 0.9  # "adaptive": the moving average's decay per step, in [0, 1)
    chunk_size: int = 0  # >0: response positions per chunk of the loss (rematerialized); 0: whole

    def __post_init__(self):
        _check_choice("loss.opd", self.opd, OPD_LOSSES)
        _check_choice("loss.consistency", self.consistency, CONSISTENCY_LOSSES)
        _check_range("loss.top_k", self.top_k, 1)
        _check_range("loss.beta", self.beta, 0.0)
        _check_range("loss.beta_start_step", self.beta_start_step, 0)
        _check_range("loss.beta_ramp_steps", self.beta_ramp_steps, 0)
        _check_range("loss.chunk_size", self.chunk_size, 0)
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"loss.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        _check_schedule("loss.beta", self.beta_schedule, self.beta_ramp_steps, BETA_SCHEDULES)
        if not 0.0 <= self.beta_kl_ema < 1.0:
            raise ValueError(f"loss.beta_kl_ema must be in [0, 1), got {self.beta_kl_ema}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        adaptive_keys = [
            k for k in ("beta_start_kl", "beta_kl_ema") if getattr(self, k) != defaults[k]
        ]
        if self.beta_schedule == "adaptive":
            if self.beta_start_kl <= 0.0:
                raise ValueError(
                    "loss.beta_schedule='adaptive' needs loss.beta_start_kl > 0 (the reverse KL "
                    f"below which NCA switches on), got {self.beta_start_kl}"
                )
            for key in ("beta_start_step", "beta_ramp_steps"):
                if getattr(self, key):
                    raise ValueError(
                        f"loss.{key} would be ignored (loss.beta_schedule='adaptive' starts "
                        "on the reverse KL): remove the setting"
                    )
        elif adaptive_keys:
            raise ValueError(
                f"{', '.join('loss.' + k for k in adaptive_keys)} would be ignored (only "
                "loss.beta_schedule='adaptive' reads it): remove the setting"
            )

    @property
    def uses_consistency(self) -> bool:
        return self.beta > 0.0


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    """The retention anchor: each step also samples y' ~ p_student(. | c', x) under a context c'
    drawn per row from the anchor pool, and adds gamma(step) * reverse KL(student || frozen anchor)
    over the full vocabulary on [c' | x | y'], so distillation keeps the model reading contexts
    other than the distilled one. The anchor is the step's frozen teacher: the starting student
    when `teacher=` is empty; with `teacher=` set, that teacher (no third model in memory).

    The pool is the task's contexts minus the distilled one and minus `held_out` (never drawn, so
    evaluation can tell protected contexts from unseen ones), or the contexts of `pool_file` (one
    per line of a text file, or JSONL lines `{"context": ..., "name": ...}`) minus `held_out`.
    """

    gamma: float = 0.0  # 0: off, the step is exactly the plain OPD/NCA step
    gamma_schedule: str = "constant"  # as loss.beta_schedule: "constant" | "delayed" | "linear"
    gamma_start_step: int = 0
    gamma_ramp_steps: int = 0
    pool_file: str | None = None  # None: the task's other contexts
    held_out: tuple[str, ...] = ()  # names of pool contexts the anchor never draws

    def __post_init__(self):
        _check_range("retention.gamma", self.gamma, 0.0)
        _check_range("retention.gamma_start_step", self.gamma_start_step, 0)
        _check_range("retention.gamma_ramp_steps", self.gamma_ramp_steps, 0)
        _check_schedule("retention.gamma", self.gamma_schedule, self.gamma_ramp_steps)
        if len(set(self.held_out)) != len(self.held_out):
            raise ValueError(f"retention.held_out names a context twice: {list(self.held_out)}")

    @property
    def enabled(self) -> bool:
        return self.gamma > 0.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * learning_rate`;
    `min_lr_ratio: 1.0` holds the peak rate constant after warmup (so a later start of a loss
    term is not also a weaker one)."""

    learning_rate: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    def __post_init__(self):
        _check_range("optim.learning_rate", self.learning_rate, 0.0)
        _check_range("optim.warmup_steps", self.warmup_steps, 0)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)
        _check_range("optim.grad_clip", self.grad_clip, 0.0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the student samples its own answers during training (no context in front)."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        _check_range("rollout.max_new_tokens", self.max_new_tokens, 1)
        _check_range("rollout.temperature", self.temperature, 0.0)
        if self.top_k is not None:
            _check_range("rollout.top_k", self.top_k, 1)
        # Checked here, not only by the sampler: its message cannot name the config key.
        if self.top_p is not None and (
            isinstance(self.top_p, bool)
            or not isinstance(self.top_p, (int, float))
            or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(
                f"rollout.top_p must be null or a number in (0, 1], got {self.top_p!r}"
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: data x fsdp x tensor. -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == 0 or value < -1:
                raise ValueError(f"mesh.{f.name} must be >= 1 or -1 (the rest), got {value}")


SAMPLED_EVAL_DRAWS = 4  # answers per item and view when sampling and `eval.samples` is unset


def eval_draws(temperature: float, samples: int | None, coupled_views: bool = False) -> int:
    """The number of answers drawn per item and view: 1 when greedy (temperature 0: the answer is
    deterministic, more draws repeat it), `samples` (default SAMPLED_EVAL_DRAWS) when sampling.
    Raises on a setting that would silently do nothing."""
    if temperature == 0:
        if samples not in (None, 1):
            raise ValueError(
                f"eval.samples={samples} needs eval.temperature > 0 (greedy answers are "
                "deterministic: more draws repeat the same answer)"
            )
        if coupled_views:
            raise ValueError(
                "eval.coupled_views needs eval.temperature > 0 (greedy answers share no noise)"
            )
        return 1
    if samples is None:
        return SAMPLED_EVAL_DRAWS
    _check_range("eval.samples", samples, 1)
    return samples


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Removability evaluation (`ctxjax.evaluate.evaluate_context`).

    Two modes: greedy (`temperature: 0`, one deterministic answer per item and view: identical
    views give Harm 0) and sampled (`temperature > 0`, `samples` independent draws per item and
    view; accuracies are means over the draws; Harm, Help and BothCorrect are over the (item,
    draw) pairs).
    """

    examples: int = 128  # records per evaluated context
    batch_size: int = 64
    # Sampled answers (as in the paper): a nudge context changes how *reliably* the model answers,
    # which greedy decoding hides. 0 gives greedy answers.
    temperature: float = 1.0
    # Draws per item and view when sampling; None: SAMPLED_EVAL_DRAWS (greedy always draws one).
    samples: int | None = None
    # Common random numbers: the with-context view reuses the no-context view's sampling noise.
    # Biased towards Harm 0: where the two views' distributions agree the draws are identical, and
    # agreement is what NCA trains for. Off by default; only for a deliberate paired comparison.
    coupled_views: bool = False
    max_new_tokens: int = 16
    seed: int = 1234

    def __post_init__(self):
        _check_range("eval.examples", self.examples, 1)
        _check_range("eval.batch_size", self.batch_size, 1)
        _check_range("eval.max_new_tokens", self.max_new_tokens, 1)
        _check_range("eval.temperature", self.temperature, 0.0)
        eval_draws(self.temperature, self.samples, self.coupled_views)


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """The tiny context-following base model built (or reused) when `student` is empty."""

    sft_steps: int = 600
    sft_examples: int = 20000
    batch_size: int = 64
    learning_rate: float = 3e-3
    vocab_size: int = 320  # byte-level BPE: 256 bytes + 3 specials + merges
    cache_dir: str = "runs/base"
    seed: int = 0  # the base model's own seed: OPD seeds (train.seed) share one base model


DEFAULT_CONTEXT = "careful"  # the embedded CPU default's distilled context


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What is distilled and evaluated.

    `name="jsonl"` reads the user's records (`data.train_file`, `data.eval_file`); its options are
    `ctxjax.tasks.jsonl.JsonlTask`'s (`verifier`, `eval_fraction`, `context_regime`) and default to
    none, and its `context` defaults to "" (the run-level context, or the file's only one).
    """

    name: str = "synthetic"  # a name in ctxjax.tasks.TASKS ("jsonl": the user's records)
    context: str = DEFAULT_CONTEXT  # the context distilled (a name in task.contexts())
    # Keyword arguments of the task; a preset's `options` replaces these as a whole. The default
    # is the embedded CPU world, `ctxjax.tasks.synthetic.default_options()`.
    options: dict = dataclasses.field(default_factory=synthetic.default_options)

    def __post_init__(self):
        if self.name == "jsonl":  # the synthetic world's defaults mean nothing for a user's file
            if self.options == synthetic.default_options():
                object.__setattr__(self, "options", {})
            if self.context == DEFAULT_CONTEXT:
                object.__setattr__(self, "context", "")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seed: int = 0
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many parts
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only before and after training
    checkpoint_every: int = 50  # 0: no checkpoints
    keep_checkpoints: int = 3
    # True: a checkpoint is written while the next steps run. On a CPU the device memory is the
    # host's, and the step cannot reuse the state's buffers while the writer still reads them, so
    # the overlap holds a second copy of the state (docs/memory.md). False: each save finishes
    # before the next step (the same numbers, the write no longer overlapped).
    async_checkpoint: bool = True
    out_dir: str = "runs/default"

    def __post_init__(self):
        _check_range("train.steps", self.steps, 0)
        _check_range("train.micro_batches", self.micro_batches, 1)
        _check_range("train.log_every", self.log_every, 1)
        _check_range("train.eval_every", self.eval_every, 0)
        _check_range("train.checkpoint_every", self.checkpoint_every, 0)
        _check_range("train.keep_checkpoints", self.keep_checkpoints, 1)


# The CPU base-model sizes (`model.*` fields; the vocabulary comes from the run config). The run
# default is "medium"; the base-model grid builds every size.
MODEL_SIZES = {
    "small": dict(num_layers=2, hidden_size=48, intermediate_size=192, num_heads=4, num_kv_heads=2),
    "medium": dict(
        num_layers=4, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2
    ),
}
# The CPU default's data shapes.
DEFAULT_DATA = DataConfig(batch_size=32, max_prompt_tokens=32, max_context_prompt_tokens=64)
# The architecture of the base model built when `student` is empty (the CPU default).
BASE_ARCHITECTURE = ModelConfig(vocab_size=320, **MODEL_SIZES["medium"])


def _changed_keys(section: str, value: Any, default: Any) -> list[str]:
    """Dotted names of the fields of `value` that differ from `default` (same dataclass)."""
    return [
        f"{section}.{f.name}"
        for f in dataclasses.fields(value)
        if getattr(value, f.name) != getattr(default, f.name)
    ]


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Refuses NaN/inf anywhere in the tree: `nan < 0` is False, so range checks let NaN through
    (loss.beta=nan, optim.learning_rate=inf would train on NaN)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # HF folder of the student; "" builds/reuses the tiny base model for `task` (CPU default).
    student: str = ""
    # HF folder of a teacher sharing the tokenizer (cross-size distillation); "": frozen student;
    # "base:<size>": the task's base model at that size of MODEL_SIZES (train.resolve_teacher).
    teacher: str = ""
    tokenizer: str = ""  # HF tokenizer folder; "" = the student's folder
    # The architecture of the base model to build; with `student` set it comes from that folder's
    # config.json, and setting it here is an error.
    model: ModelConfig = BASE_ARCHITECTURE
    numerics: Numerics = DEFAULT_NUMERICS  # dtypes and remat: apply to student and teacher alike
    base: BaseModelConfig = BaseModelConfig()
    task: TaskConfig = TaskConfig()
    data: DataConfig = DEFAULT_DATA
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    retention: RetentionConfig = RetentionConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    eval: EvalConfig = EvalConfig()
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        _check_finite(self)
        ignored = []  # (keys, why): settings this run would silently not use
        if self.student:
            ignored.append(
                (
                    _changed_keys("model", self.model, BASE_ARCHITECTURE),
                    "with student= the architecture comes from the student's config.json",
                )
            )
        if not self.retention.enabled:  # pool and held_out still split the retention report
            changed = _changed_keys("retention", self.retention, RetentionConfig())
            ignored.append(
                (
                    [k for k in changed if k.startswith("retention.gamma_")],
                    "retention.gamma is 0: the anchor is off",
                )
            )
        for keys, why in ignored:
            if keys:
                raise ValueError(f"{', '.join(keys)} would be ignored ({why}): remove the setting")
        base_keys = _changed_keys("base", self.base, BaseModelConfig())
        if self.student and base_keys:
            # A warning, not an error: the CPU presets set base.* and stay usable with student=.
            log.warning("%s ignored: student= is set, no base model is built", ", ".join(base_keys))
        if 0 < self.train.steps <= self.optim.warmup_steps:
            # Legal (the schedule shortens the warmup to fit), but the peak rate is never held.
            log.warning(
                "train.steps=%d is not above optim.warmup_steps=%d: the learning rate never "
                "leaves its warmup",
                self.train.steps,
                self.optim.warmup_steps,
            )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks (and mildly converts: int -> float, list -> tuple) a leaf value against its type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except TypeError:
                pass
        raise TypeError(f"config key {key!r} expects {hint}, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            raise TypeError(f"config key {key!r} expects float, got {value!r}") from None
    if hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise TypeError(f"config key {key!r} expects a list, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise TypeError(f"config key {key!r} expects a mapping, got {value!r}")
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise TypeError(f"config key {key!r} expects {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, starting from its defaults; strict about keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    base = cls()
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise KeyError(
                f"unknown config key {full!r}; valid keys"
                f"{' under ' + prefix[:-1] if prefix else ''}: {sorted(fields)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise TypeError(
                    f"config key {full!r} is a section; expected a mapping, got {value!r}"
                )
            current = dataclasses.asdict(getattr(base, key))
            kwargs[key] = from_dict(hint, _deep_merge(current, value, full), prefix=full + ".")
        else:
            kwargs[key] = _coerce(full, value, hint)
    return dataclasses.replace(base, **kwargs)


def _deep_merge(base: dict, update: dict, where: str) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _deep_merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["loss.beta=0.1", "task.options.sloppy=0.4"]` -> nested dict of YAML scalar values."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} sets a key below a value")
        node[parts[-1]] = value
    return tree


def read_yaml_mapping(path: str, what: str = "config file") -> dict:
    """A YAML file holding a mapping (empty file: {}); FileNotFoundError or ValueError naming it."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a YAML file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping at the top level")
    return values


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the YAML preset at `path`, then the dotted overrides, all strictly checked."""
    values = read_yaml_mapping(path) if path else {}
    # Task options: a preset's `options` (or `task.options={...}`) replaces the defaults as a whole,
    # while `task.options.key=value` changes one option of whatever options are in force.
    option_edits = [o for o in overrides if o.split("=", 1)[0].strip().startswith("task.options.")]
    others = [o for o in overrides if o not in option_edits]
    values = _deep_merge(values, parse_overrides(others), "")
    if option_edits:
        task = values.setdefault("task", {})
        if not isinstance(task, dict):
            raise TypeError(f"config key 'task' is a section; expected a mapping, got {task!r}")
        current = task.get("options", TaskConfig(name=task.get("name", "synthetic")).options)
        edits = parse_overrides(option_edits)["task"]["options"]
        task["options"] = {**dict(current or {}), **edits}
    try:
        return from_dict(RunConfig, values)
    except (KeyError, TypeError, ValueError) as e:
        where = f" (in {path} or the command line)" if path else ""
        raise type(e)(f"{e.args[0]}{where}") from None


def to_dict(cfg: Any) -> dict:
    """A config dataclass as plain JSON values (tuples become lists): what config.json,
    summaries and checkpoints hold."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True, default=list)
