"""Removability evaluation: answer each prompt without and with the context, verify, compare.

For a task and the distilled context: Acc_x, Acc_xc, Harm = P(wrong with c | right without c),
BothCorrect, Help, Δlen, per-layer cosine similarity of hidden states at the response positions of
the no-context answer under the two views, and retention (Acc_xc under every *other* context of the
task: a distilled model that can no longer read any context has lost more than one prompt's worth).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctxjax import metrics as metrics_lib
from ctxjax.data import bucket_length, pad_left
from ctxjax.hf import render_chat
from ctxjax.model import Transformer
from ctxjax.sampling import generate


@dataclasses.dataclass(frozen=True)
class ViewAnswers:
    """Decoded answers to the same records under one view."""

    texts: list[str]
    lengths: np.ndarray  # [N] tokens generated, EOS included
    tokens: list[list[int]]  # generated ids, through EOS


def eos_and_pad(tokenizer: Any) -> tuple[tuple[int, ...], int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; set one (generation needs a stop token)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return (int(eos),), int(pad)


def answer_view(
    model: Transformer,
    tokenizer: Any,
    records: list[dict],
    *,
    with_context: bool,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> ViewAnswers:
    """Generates an answer for every record, with its context in front or without it."""
    eos_ids, pad_id = eos_and_pad(tokenizer)
    texts, lengths, tokens = [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [
            render_chat(tokenizer, r.get("context", "") if with_context else "", r["prompt"])
            for r in chunk
        ]
        out = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_ids=eos_ids,
            seed=seed + start,
            pad_id=pad_id,
        )
        for row in range(len(chunk)):
            n = int(out.lengths_B[row])
            ids = [int(t) for t in out.tokens_BxN[row, :n]]
            tokens.append(ids)
            lengths.append(n)
            texts.append(
                tokenizer.decode(
                    [t for t in ids if t not in eos_ids], skip_special_tokens=True
                ).strip()
            )
    return ViewAnswers(texts=texts, lengths=np.asarray(lengths), tokens=tokens)


@partial(jax.jit, static_argnums=0)
def _layer_cosines(graphdef, state, ids_x, mask_x, ids_c, mask_c, resp_x, resp_c):
    """[layers+1, B, n] cosine between the two views at the response slots `resp_*` ([B, n])."""
    model = nnx.merge(graphdef, state)

    def hidden(ids, mask, resp):
        layers = model.forward(ids, mask_BxL=mask, return_layer_hidden=True).layer_hidden
        # Gather the response slots of each layer before stacking: stacking first would hold
        # [layers+1, B, L, D] at once, which for a real model and long prompts is gigabytes.
        # Response tokens are right-aligned in both sequences, so the same column index of `resp`
        # picks the same response position.
        return jnp.stack(
            [jnp.take_along_axis(h.astype(jnp.float32), resp[:, :, None], axis=1) for h in layers]
        )

    h_x, h_c = hidden(ids_x, mask_x, resp_x), hidden(ids_c, mask_c, resp_c)
    # The norm product is floored, not offset (as in `metrics.cosine_by_layer`): identical vectors
    # then give 1 up to rounding, whatever their scale (a +1e-8 offset biases small-norm layers).
    norms = jnp.linalg.norm(h_x, axis=-1) * jnp.linalg.norm(h_c, axis=-1)
    return (h_x * h_c).sum(-1) / jnp.maximum(norms, 1e-8)


def layer_cosine(
    model: Transformer,
    tokenizer: Any,
    records: list[dict],
    answers_x: ViewAnswers,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean cosine similarity per layer (embeddings first) between the hidden states of the
    no-context answer's tokens read under `[x | y]` and under `[c | x | y]`."""
    _, pad_id = eos_and_pad(tokenizer)
    graphdef, state = nnx.split(model)
    total, count = None, 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        seqs_x, seqs_c, resp_len = [], [], []
        for r, y in zip(chunk, answers_x.tokens[start : start + batch_size]):
            y = y or [pad_id]
            seqs_x.append(render_chat(tokenizer, "", r["prompt"]) + y)
            seqs_c.append(render_chat(tokenizer, r.get("context", ""), r["prompt"]) + y)
            resp_len.append(len(y))
        width_x = bucket_length(max(map(len, seqs_x)))
        width_c = bucket_length(max(map(len, seqs_c)))
        ids_x, mask_x = pad_left(seqs_x, width_x, pad_id)
        ids_c, mask_c = pad_left(seqs_c, width_c, pad_id)
        n = bucket_length(max(resp_len), minimum=1)
        cols = np.arange(n)[None, :]
        valid = cols < np.asarray(resp_len)[:, None]
        # Column j of the last `len(y)` slots; padded columns repeat the last slot and are masked out.
        resp_x = np.where(valid, width_x - np.asarray(resp_len)[:, None] + cols, width_x - 1)
        resp_c = np.where(valid, width_c - np.asarray(resp_len)[:, None] + cols, width_c - 1)
        cos = _layer_cosines(graphdef, state, ids_x, mask_x, ids_c, mask_c, resp_x, resp_c)
        cos = np.asarray(cos) * valid[None]
        summed = cos.sum(axis=(1, 2))
        total = summed if total is None else total + summed
        count += int(valid.sum())
    return total / max(count, 1)


def evaluate_context(
    model: Transformer,
    tokenizer: Any,
    task: Any,
    context_name: str,
    *,
    examples: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 1234,
    retention: bool = True,
    with_cosine: bool = True,
) -> dict:
    """All removability metrics for one context of a task; JSON-ready."""
    records = task.eval_records(context_name, examples, seed)
    kw = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size, seed=seed
    )
    ans_x = answer_view(model, tokenizer, records, with_context=False, **kw)
    ans_c = answer_view(model, tokenizer, records, with_context=True, **kw)
    correct_x = np.array([task.verify(r, y) for r, y in zip(records, ans_x.texts)])
    correct_c = np.array([task.verify(r, y) for r, y in zip(records, ans_c.texts)])
    result = dict(
        context=context_name,
        **metrics_lib.removability_metrics(correct_x, correct_c, ans_x.lengths, ans_c.lengths),
    )
    if with_cosine:
        result["layer_cosine"] = [
            float(c) for c in layer_cosine(model, tokenizer, records, ans_x, batch_size)
        ]
    if retention:
        others = {}
        for name in task.contexts():
            if name == context_name:
                continue
            other = task.eval_records(name, examples, seed + 1)
            ans = answer_view(model, tokenizer, other, with_context=True, **kw)
            others[name] = float(np.mean([task.verify(r, y) for r, y in zip(other, ans.texts)]))
        result["retention"] = others
        result["retention_mean"] = float(np.mean(list(others.values()))) if others else float("nan")
    result["samples"] = [
        dict(
            prompt=r["prompt"],
            context=r.get("context", ""),
            answer=r.get("answer", ""),
            y_x=a,
            y_xc=b,
        )
        for r, a, b in list(zip(records, ans_x.texts, ans_c.texts))[:8]
    ]
    result["lengths_x"] = ans_x.lengths.tolist()
    result["lengths_xc"] = ans_c.lengths.tolist()
    return result


# --------------------------------------------------------------------------------------------------
# Whole evaluation of an HF model folder (behind `scripts/eval.py`; the report is written by the
# harness, `experiments.eval_report`). Its imports are local so that this section stays an appendix.
# --------------------------------------------------------------------------------------------------

# The keys of `evaluate_context` that accept a value from `evaluate_checkpoint(**eval_kwargs)`.
EVAL_KWARGS = (
    "examples",
    "max_new_tokens",
    "temperature",
    "batch_size",
    "seed",
    "retention",
    "with_cosine",
)


class InputError(ValueError):
    """A bad model path, task, context, task option or evaluation setting (the CLI exits 2)."""


def parse_task_options(items: list[str]) -> dict:
    """`["min_len=3", "families=[sum]"]` -> {"min_len": 3, "families": ["sum"]} (YAML values)."""
    import yaml

    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"task option {item!r} must look like key=value")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise InputError(f"task option {item!r}: value is not valid YAML ({e})") from None
    return options


def _check_model_folder(path: str, what: str) -> None:
    import os

    if not os.path.isdir(path):
        raise InputError(f"{what} folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"{what} folder {path} has no config.json (not an HF model folder)")


def _resolve_task(task_name: str, context: str, task_options: dict | None):
    from ctxjax.tasks import get_task

    try:
        task = get_task(task_name, **(task_options or {}))
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None
    valid = task.contexts()
    if context not in valid:
        raise InputError(
            f"unknown context {context!r} for task {task_name!r}; valid: {sorted(valid)}"
        )
    return task


def _eval_settings(eval_kwargs: dict) -> dict:
    from ctxjax.config import EvalConfig

    unknown = sorted(set(eval_kwargs) - set(EVAL_KWARGS))
    if unknown:
        raise InputError(f"unknown evaluation setting(s) {unknown}; valid: {list(EVAL_KWARGS)}")
    defaults = {k: v for k, v in dataclasses.asdict(EvalConfig()).items() if k in EVAL_KWARGS}
    settings = {**defaults, "retention": True, "with_cosine": True, **eval_kwargs}
    try:  # the same range checks as the `eval` section of a training config
        EvalConfig(**{k: settings[k] for k in defaults})
    except (TypeError, ValueError) as e:
        raise InputError(str(e)) from None
    return settings


def evaluate_checkpoint(
    model_path: str,
    task_name: str,
    context: str,
    *,
    task_options: dict | None = None,
    baseline_path: str | None = None,
    tokenizer_path: str | None = None,
    param_dtype: str = "float32",
    **eval_kwargs: Any,
) -> dict:
    """Evaluates the HF folder `model_path` on one context of a task (and `baseline_path` likewise).

    `eval_kwargs` are `evaluate_context`'s settings (`EVAL_KWARGS`; defaults from `EvalConfig`, with
    retention and cosine on). The tokenizer comes from `tokenizer_path`, else the model's folder
    (the baseline's likewise). Everything the user names is checked before any model is loaded;
    a bad value raises `InputError` naming it (and the valid choices). Returns the result, with
    "model", "task", "task_options", "settings", and the baseline's result under "baseline" when
    given.
    """
    import os

    from ctxjax import hf
    from ctxjax.model import DTYPES

    if param_dtype not in DTYPES:
        raise InputError(f"param_dtype must be one of {sorted(DTYPES)}, got {param_dtype!r}")
    _check_model_folder(model_path, "model")
    if baseline_path is not None:
        _check_model_folder(baseline_path, "baseline model")
    if tokenizer_path is not None and not os.path.isdir(tokenizer_path):
        raise InputError(f"tokenizer folder not found: {tokenizer_path}")
    task = _resolve_task(task_name, context, task_options)
    settings = _eval_settings(eval_kwargs)

    def run(path: str) -> dict:
        model = hf.load_model(path, param_dtype=param_dtype)
        tokenizer = hf.load_tokenizer(tokenizer_path or path)
        result = evaluate_context(model, tokenizer, task, context, **settings)
        return {
            "model": os.path.abspath(path),
            "task": task_name,
            "task_options": dict(task_options or {}),
            "settings": settings,
            **result,
        }

    result = run(model_path)
    if baseline_path is None:
        return result
    return {**result, "baseline": run(baseline_path)}
