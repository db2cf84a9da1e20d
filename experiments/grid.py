"""Grids are data: the strict loaders of `configs/base_models.yaml` and `configs/grids/*.yaml`, and
the plan (grid -> one `RunSpec` per run).

Every mapping is checked: the files' own keys against typed frozen dataclasses, and every override
against the run config (`ctxjax.config.RunConfig`, via `from_dict`), so a mistyped key is a
`GridError` naming the file and the place in it (`tasks.frozenlake.overrides`, `variants.nca`, ...).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from typing import Any

import yaml

from ctxjax.config import (
    MODEL_SIZES,
    BaseModelConfig,
    RunConfig,
    TaskConfig,
    from_dict,
    load_config,
    read_yaml_mapping,
)
from ctxjax.model import ModelConfig


class GridError(ValueError):
    """A grid or base-models file that does not describe valid runs (the message names the file)."""


# --------------------------------------------------------------------------------------------------
# Reading a file strictly
# --------------------------------------------------------------------------------------------------


def _read_yaml(path: str) -> dict:
    try:
        return read_yaml_mapping(path, what="file")
    except (FileNotFoundError, ValueError) as e:
        raise GridError(str(e)) from None


def _parse(cls: type, values: Any, path: str, where: str) -> Any:
    """`cls` (a frozen dataclass whose fields all have defaults) from `values`, strict about keys;
    an error names `path` and `where`."""
    if not isinstance(values, dict):
        raise GridError(f"{path}: {where or 'the file'} must be a mapping, got {values!r}")
    try:
        return from_dict(cls, values)
    except (KeyError, TypeError, ValueError) as e:
        raise GridError(f"{path}: {where or 'top level'}: {e.args[0]}") from None


def _check_overrides(overrides: Any, path: str, where: str) -> dict:
    """Nested run-config overrides, checked against `RunConfig` (unknown key -> error)."""
    _parse(RunConfig, overrides, path, where)
    return overrides


# --------------------------------------------------------------------------------------------------
# configs/base_models.yaml
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BaseModelsFile:
    cache_dir: str = "runs/base"
    eval: dict = dataclasses.field(default_factory=dict)
    tasks: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BaseEval:
    """How `build_all` checks that a base model reads its contexts."""

    examples: int = 64
    temperature: float = 1.0
    max_new_tokens: int = 24


@dataclasses.dataclass(frozen=True)
class BaseModelEntry:
    """One base model per size: a task (the entry's name), its options and `base.*` settings."""

    task: str
    options: dict
    base: dict  # the `base.*` fields the entry sets (BaseModelConfig), checked

    def overrides(self) -> dict:
        """The run-config overrides that make a run start from this base model."""
        return {"task": {"name": self.task, "options": dict(self.options)}, "base": dict(self.base)}

    def base_config(self, cache_dir: str) -> BaseModelConfig:
        return dataclasses.replace(BaseModelConfig(**self.base), cache_dir=cache_dir)


@dataclasses.dataclass(frozen=True)
class BaseModelsSpec:
    path: str
    cache_dir: str
    sizes: dict[str, dict]  # size name -> `model.*` fields (ctxjax.config.MODEL_SIZES)
    eval: BaseEval
    entries: dict[str, BaseModelEntry]

    def model_config(self, size: str, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(ModelConfig(vocab_size=vocab_size), **self.sizes[size])


def load_base_models(path: str) -> BaseModelsSpec:
    """`configs/base_models.yaml`, strictly: unknown keys anywhere are a `GridError` naming them."""
    raw = _parse(_BaseModelsFile, _read_yaml(path), path, "")
    entries = {}
    for name, entry in raw.tasks.items():
        where = f"tasks.{name}"
        if not isinstance(entry, dict):
            raise GridError(f"{path}: {where} must be a mapping, got {entry!r}")
        # No `options`: the library's defaults for the task (TaskConfig), not a copy of them.
        options = entry.get("options")
        options = TaskConfig(name=name).options if options is None else options
        base = {k: v for k, v in entry.items() if k != "options"}
        if "cache_dir" in base:
            raise GridError(f"{path}: {where}: cache_dir is set once, at the top level")
        _check_overrides({"task": {"name": name, "options": options}, "base": base}, path, where)
        entries[name] = BaseModelEntry(name, dict(options), base)
    return BaseModelsSpec(
        path=path,
        cache_dir=raw.cache_dir,
        sizes=dict(MODEL_SIZES),
        eval=_parse(BaseEval, raw.eval, path, "eval"),
        entries=entries,
    )


# --------------------------------------------------------------------------------------------------
# configs/grids/*.yaml
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GridFile:
    base_models: str = "../base_models.yaml"
    sizes: tuple = ()
    base_seeds: tuple = (0,)
    seeds: tuple = ()
    common: dict = dataclasses.field(default_factory=dict)
    tasks: dict = dataclasses.field(default_factory=dict)
    variants: dict = dataclasses.field(default_factory=dict)
    headline_variants: tuple = ()
    cells: tuple = ()
    ablations: dict | None = None
    retention: dict | None = None  # the retention-anchor comparison
    flip: dict | None = None  # flip-rule cells run long enough for OPD to internalize the rule


@dataclasses.dataclass(frozen=True)
class _TaskEntry:
    base_model: str = ""
    overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str = ""  # a label of the grid's `tasks`
    context: str = ""
    # Ablation cells name theirs; a headline cell takes every size of the grid unless it names one
    # (a cross-size cell: only the student smaller than its `teacher=base:<size>` makes sense).
    size: str = ""


@dataclasses.dataclass(frozen=True)
class _Block:
    """A block of the grid file beyond the headline (`ablations`, `retention`, `flip`): its own
    variants, seeds and cells, each cell naming its size."""

    variants: tuple = ()
    base_seeds: tuple = ()  # none: the grid's
    seeds: tuple = ()
    cells: tuple = ()


# The blocks a grid file may hold, in the order the plan runs them (after the headline).
BLOCKS = ("ablations", "retention", "flip")


@dataclasses.dataclass(frozen=True)
class Block:
    variants: tuple[str, ...]
    base_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    cells: tuple[Cell, ...]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    task: str  # the cell's task label (e.g. "synthetic600"), not necessarily a task name
    context: str
    size: str
    variant: str
    base_seed: int  # `base.seed`: the runs of one base seed share one built base model
    seed: int  # `train.seed`: the distillation's own seed
    task_name: str  # the task (`ctxjax.tasks`) the label's base model is built on
    overrides: tuple[str, ...]  # dotted `key=value` overrides of the run config, in order

    @property
    def name(self) -> str:
        return (
            f"{self.task}-{self.context}-{self.size}-{self.variant}-b{self.base_seed}-s{self.seed}"
        )

    @property
    def cell(self) -> str:
        return f"{self.task}/{self.context}/{self.size}"

    @property
    def run_dir_name(self) -> str:
        """The name plus a hash of the overrides: a run made under other settings (another base
        model's SFT budget, other steps) is never mistaken for this one and reused."""
        digest = hashlib.sha256("\n".join(self.overrides).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


@dataclasses.dataclass(frozen=True)
class Grid:
    path: str
    base_models: BaseModelsSpec
    sizes: tuple[str, ...]
    base_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    common: dict
    tasks: dict[str, tuple[BaseModelEntry, dict]]  # label -> (its base model, its overrides)
    variants: dict[str, dict]
    headline_variants: tuple[str, ...]
    cells: tuple[Cell, ...]
    blocks: dict[str, Block] = dataclasses.field(default_factory=dict)  # name (BLOCKS) -> block


def _raw_grid(path: str) -> dict:
    """The file's mapping with `extends` resolved: the parent's top-level keys, ours replacing."""
    values = _read_yaml(path)
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise GridError(f"{path}: extends must be a file name, got {parent!r}")
    parent_path = os.path.join(os.path.dirname(path), parent)
    inherited = _raw_grid(parent_path)
    # A `base_models` path is relative to the file that names it.
    if "base_models" in inherited and "base_models" not in values:
        where = os.path.dirname(parent_path)
        values["base_models"] = os.path.relpath(
            os.path.join(where, inherited["base_models"]), os.path.dirname(path) or "."
        )
    return {**inherited, **values}


def _cells(items: tuple, path: str, where: str, grid_tasks: dict, sizes) -> tuple[Cell, ...]:
    """`sizes`: the valid sizes of cells that must name one (ablations); None: headline cells."""
    all_sizes = MODEL_SIZES if sizes is None else sizes
    cells = []
    for i, item in enumerate(items):
        cell = _parse(Cell, item, path, f"{where}[{i}]")
        if cell.task not in grid_tasks:
            raise GridError(
                f"{path}: {where}[{i}]: unknown task {cell.task!r}; valid: {sorted(grid_tasks)}"
            )
        if not cell.context:
            raise GridError(f"{path}: {where}[{i}]: a cell needs a context")
        if (sizes is not None or cell.size) and cell.size not in all_sizes:
            raise GridError(f"{path}: {where}[{i}]: size {cell.size!r} not in {sorted(all_sizes)}")
        cells.append(cell)
    return tuple(cells)


def _names(items: tuple, valid, path: str, where: str) -> tuple:
    unknown = [x for x in items if x not in valid]
    if unknown:
        raise GridError(f"{path}: {where}: unknown {unknown}; valid: {sorted(valid)}")
    return tuple(items)


def _seeds(items: tuple, path: str, where: str) -> tuple[int, ...]:
    """Distinct integers: a repeated seed would count one run twice in every mean and interval."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        raise GridError(f"{path}: {where}: seeds are integers, got {list(items)}")
    if len(set(items)) != len(items):
        raise GridError(f"{path}: {where}: a seed is repeated in {list(items)}")
    return tuple(items)


def load_grid(path: str) -> Grid:
    """A grid file, strictly (see the module docstring); every run it plans is a valid config."""
    raw = _parse(_GridFile, _raw_grid(path), path, "")
    base_models = load_base_models(os.path.join(os.path.dirname(path), raw.base_models))
    common = _check_overrides(raw.common, path, "common")
    tasks = {}
    for label, entry in raw.tasks.items():
        task = _parse(_TaskEntry, entry, path, f"tasks.{label}")
        if task.base_model not in base_models.entries:
            raise GridError(
                f"{path}: tasks.{label}: unknown base_model {task.base_model!r}; valid: "
                f"{sorted(base_models.entries)} ({base_models.path})"
            )
        over = _check_overrides(task.overrides, path, f"tasks.{label}.overrides")
        tasks[label] = (base_models.entries[task.base_model], over)
    variants = {
        name: _check_overrides(v, path, f"variants.{name}") for name, v in raw.variants.items()
    }
    sizes = _names(raw.sizes, base_models.sizes, path, "sizes")
    base_seeds = _seeds(raw.base_seeds, path, "base_seeds")
    blocks = {}
    for name in BLOCKS:
        block = _parse(_Block, getattr(raw, name) or {}, path, name)
        blocks[name] = Block(
            variants=_names(block.variants, variants, path, f"{name}.variants"),
            base_seeds=_seeds(block.base_seeds, path, f"{name}.base_seeds") or base_seeds,
            seeds=_seeds(block.seeds, path, f"{name}.seeds"),
            cells=_cells(block.cells, path, f"{name}.cells", tasks, base_models.sizes),
        )
    grid = Grid(
        path=path,
        base_models=base_models,
        sizes=sizes,
        base_seeds=base_seeds,
        seeds=_seeds(raw.seeds, path, "seeds"),
        common=common,
        tasks=tasks,
        variants=variants,
        headline_variants=_names(raw.headline_variants, variants, path, "headline_variants"),
        cells=_cells(raw.cells, path, "cells", tasks, None),
        blocks=blocks,
    )
    for spec in plan(grid):  # the layers are valid one by one; their combination must be too
        try:
            load_config(None, list(spec.overrides))
        except (KeyError, TypeError, ValueError) as e:
            raise GridError(f"{path}: run {spec.name}: {e.args[0]}") from None
    return grid


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def _value(value: Any) -> str:
    """A leaf as override text that YAML reads back as the same value."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)


def dotted(overrides: dict, cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Nested overrides -> `["section.key=value", ...]` in order, for `ctxjax.config.load_config`.

    Sections of the run config are walked into; any other value (`task.options` included, which so
    replaces the task's options as a whole) is one leaf.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in overrides.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            out += dotted(value, hint, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_value(value)}")
    return out


def _spec(grid: Grid, cell: Cell, size: str, variant: str, base_seed: int, seed: int) -> RunSpec:
    base_model, task_overrides = grid.tasks[cell.task]
    layers = (
        grid.common,
        base_model.overrides(),
        task_overrides,
        {"task": {"context": cell.context}},
        {"model": grid.base_models.sizes[size]},
        grid.variants[variant],
        {"base": {"seed": base_seed}, "train": {"seed": seed}},
    )
    overrides = tuple(o for layer in layers for o in dotted(layer))
    return RunSpec(
        cell.task, cell.context, size, variant, base_seed, seed, base_model.task, overrides
    )


def plan(grid: Grid) -> list[RunSpec]:
    """Every run of the grid, headline first (cell, size, base seed, seed, variant), then the
    blocks (`BLOCKS`). Each cell crosses base seeds with distillation seeds: a base model rebuilt
    with another seed (or on another CPU) differs, and the intervals must include that variation.
    A run that two parts of the grid both name (a block repeating a headline variant) is planned
    once: twice would count it twice in every mean and interval."""
    specs = [
        _spec(grid, cell, size, variant, base_seed, seed)
        for cell in grid.cells
        for size in ((cell.size,) if cell.size else grid.sizes)
        for base_seed in grid.base_seeds
        for seed in grid.seeds
        for variant in grid.headline_variants
    ]
    specs += [
        _spec(grid, cell, cell.size, variant, base_seed, seed)
        for block in grid.blocks.values()
        for cell in block.cells
        for variant in block.variants
        for base_seed in block.base_seeds
        for seed in block.seeds
    ]
    first = {}
    for spec in specs:
        first.setdefault(spec.run_dir_name, spec)
    return list(first.values())
