"""Removability evaluation: answer each prompt without and with the context, verify, compare.

For a task and the distilled context: Acc_x, Acc_xc, Harm = P(wrong with c | right without c),
BothCorrect, Help, Δlen, per-layer cosine similarity of hidden states at the response positions of
the no-context answer under the two views, and retention (Acc_xc under every *other* context of the
task: a distilled model that can no longer read any context has lost more than one prompt's worth).

Randomness: greedy evaluation (temperature 0) is deterministic. Sampled evaluation draws k answers
per item and view, and each view samples from its own random stream (`stream_seed`): with one shared
stream, an (item, step) would get the same noise in both views, so wherever the two views agree the
answers are identical and Harm is 0 by construction, which is exactly what NCA trains for.
`coupled_views=True` shares the stream on purpose (common random numbers), with that bias.

Under sampling the no-context view is answered a second time, from a stream of its own: a model
disagrees with itself between two draws, so Harm has a floor the context plays no part in
(`metrics.removability_metrics`: harm_floor, excess_harm). Greedy Harm has no such floor and is the
primary endpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ctxjax import metrics as metrics_lib
from ctxjax.config import eval_draws
from ctxjax.hf import eos_and_pad, render_chat
from ctxjax.model import Transformer
from ctxjax.padding import bucket_length, pad_left
from ctxjax.sampling import generate

# Random streams of `answer_view`: one per view, and one per retention context after them.
STREAM_X, STREAM_XC, STREAM_RETENTION = 0, 1, 2
# The no-context view's second draw (Harm's floor): above any retention stream (one per context).
STREAM_X_AGAIN = 1 << 16


def stream_seed(seed: int, stream: int, start: int) -> int:
    """The sampling seed of the batch starting at record `start` of random stream `stream`.

    Hashed (numpy SeedSequence), not added: `seed + start` would give stream A's batch at `start`
    the seed of stream B's batch at another `start` whenever the offsets line up."""
    return int(np.random.SeedSequence((seed, stream, start)).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class ViewAnswers:
    """Decoded answers to the same records under one view."""

    texts: list[str]
    lengths: np.ndarray  # [N] tokens generated, EOS included
    tokens: list[list[int]]  # generated ids, through EOS


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
    stream: int = 0,
    placement: str = "system",
) -> ViewAnswers:
    """Generates an answer for every record, with its context in front or without it; sampling
    noise comes from random stream `stream` of `seed` (see `stream_seed`)."""
    eos_ids, pad_id = eos_and_pad(tokenizer)
    texts, lengths, tokens = [], [], []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [
            render_chat(
                tokenizer,
                r.get("context", "") if with_context else "",
                r["prompt"],
                placement=placement,
            )
            for r in chunk
        ]
        out = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_ids=eos_ids,
            seed=stream_seed(seed, stream, start),
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
        # Each layer's stream is gathered at the response slots as the forward goes: the whole
        # streams, [layers+1, B, L, D], would be gigabytes for a real model at an evaluation batch.
        # Response tokens are right-aligned in both sequences, so the same column index of `resp`
        # picks the same response position.
        out = model.forward(
            ids, mask_BxL=mask, return_layer_hidden=True, layer_hidden_slots_BxN=resp
        )
        return jnp.stack([h.astype(jnp.float32) for h in out.layer_hidden])

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
    placement: str = "system",
) -> np.ndarray:
    """Mean cosine similarity per layer (embeddings first) between the hidden states of the
    no-context answer's tokens read under `[x | y]` and under `[c | x | y]`."""
    _, pad_id = eos_and_pad(tokenizer)
    graphdef, state = nnx.split(model)
    total, count = None, 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        seqs_x, seqs_c, resp_len = [], [], []
        for r, y in zip(chunk, answers_x.tokens[start : start + batch_size], strict=True):
            y = y or [pad_id]
            seqs_x.append(render_chat(tokenizer, "", r["prompt"]) + y)
            context = r.get("context", "")
            seqs_c.append(render_chat(tokenizer, context, r["prompt"], placement=placement) + y)
            resp_len.append(len(y))
        width_x = bucket_length(max(map(len, seqs_x)))
        width_c = bucket_length(max(map(len, seqs_c)))
        ids_x, mask_x = pad_left(seqs_x, width_x, pad_id)
        ids_c, mask_c = pad_left(seqs_c, width_c, pad_id)
        n = bucket_length(max(resp_len), minimum=1)
        cols = np.arange(n)[None, :]
        valid = cols < np.asarray(resp_len)[:, None]
        # Column j of the last `len(y)` slots; padded columns repeat the last slot, masked out.
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
    samples: int | None = None,
    coupled_views: bool = False,
    batch_size: int = 64,
    seed: int = 1234,
    retention: bool = True,
    with_cosine: bool = True,
    placement: str = "system",
) -> dict:
    """All removability metrics for one context of a task; JSON-ready (undefined ratios are None).

    Greedy (`temperature` 0): one answer per item and view. Sampled: `samples` draws per item and
    view (default `config.SAMPLED_EVAL_DRAWS`), the two views from independent random streams;
    accuracies are means over the draws and Harm / Help / BothCorrect are over the (item, draw)
    pairs; the no-context view is drawn a second time, independently, for Harm's floor
    (harm_floor, excess_harm; absent from a greedy result, where the floor is 0 by construction).
    `coupled_views=True` gives the with-context view the no-context view's noise (common random
    numbers): lower variance for a paired comparison, but biased towards Harm 0, since views that
    agree then give identical answers. The result records `mode`, `draws` and `coupled_views`;
    `lengths_x` / `lengths_xc` and `correct_x` / `correct_xc` (per answer, for intervals over items;
    `correct_x_again` too under sampling) are [n * draws], item-major; `samples` shows each item's
    first draw.
    `placement` is where the context goes in the chat (`hf.render_chat`), as in training.
    """
    draws = eval_draws(temperature, samples, coupled_views)
    records = task.eval_records(context_name, examples, seed)
    rows = [r for r in records for _ in range(draws)]  # item-major: row i * draws + j
    kw = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        placement=placement,
    )
    ans_x = answer_view(model, tokenizer, rows, with_context=False, stream=STREAM_X, **kw)
    stream_xc = STREAM_X if coupled_views else STREAM_XC
    ans_c = answer_view(model, tokenizer, rows, with_context=True, stream=stream_xc, **kw)
    correct_x = np.array([task.verify(r, y) for r, y in zip(rows, ans_x.texts, strict=True)])
    correct_c = np.array([task.verify(r, y) for r, y in zip(rows, ans_c.texts, strict=True)])
    shape = (len(records), draws)
    correct_x_again = None
    if temperature > 0:
        again = answer_view(model, tokenizer, rows, with_context=False, stream=STREAM_X_AGAIN, **kw)
        correct_x_again = np.array(
            [task.verify(r, y) for r, y in zip(rows, again.texts, strict=True)]
        ).reshape(shape)
    result = dict(
        context=context_name,
        mode="greedy" if temperature == 0 else "sampled",
        coupled_views=coupled_views,
        **metrics_lib.removability_metrics(
            correct_x.reshape(shape),
            correct_c.reshape(shape),
            ans_x.lengths.reshape(shape),
            ans_c.lengths.reshape(shape),
            correct_x_again,
        ),
    )
    if with_cosine:
        result["layer_cosine"] = [
            float(c) for c in layer_cosine(model, tokenizer, rows, ans_x, batch_size, placement)
        ]
    if retention:
        others = {}
        for i, name in enumerate(task.contexts()):
            if name == context_name:
                continue
            other = task.eval_records(name, examples, seed + 1)
            other_rows = [r for r in other for _ in range(draws)]
            ans = answer_view(
                model,
                tokenizer,
                other_rows,
                with_context=True,
                stream=STREAM_RETENTION + i,
                **kw,
            )
            others[name] = float(
                np.mean([task.verify(r, y) for r, y in zip(other_rows, ans.texts, strict=True)])
            )
        result["retention"] = others
        result["retention_mean"] = float(np.mean(list(others.values()))) if others else None
    first = slice(0, 8 * draws, draws)  # each item's first draw
    result["samples"] = [
        dict(
            prompt=r["prompt"],
            context=r.get("context", ""),
            answer=r.get("answer", ""),
            y_x=a,
            y_xc=b,
        )
        for r, a, b in zip(rows[first], ans_x.texts[first], ans_c.texts[first], strict=True)
    ]
    result["lengths_x"] = ans_x.lengths.tolist()
    result["lengths_xc"] = ans_c.lengths.tolist()
    result["correct_x"] = correct_x.tolist()
    result["correct_xc"] = correct_c.tolist()
    if correct_x_again is not None:
        result["correct_x_again"] = correct_x_again.reshape(-1).tolist()
    return result


def retention_split(
    retention: dict[str, float], contexts: dict[str, str], pool_texts: Iterable[str]
) -> dict[str, float | None]:
    """Retention accuracy (a result's `retention`, other context -> accuracy) split by the
    retention anchor's pool: `retention_pool`, the mean over the contexts whose text the anchor
    draws, and `retention_held_out`, over the others (never drawn); None when a part is empty."""
    drawn = set(pool_texts)
    parts: dict[str, list[float]] = {"retention_pool": [], "retention_held_out": []}
    for name, acc in retention.items():
        parts["retention_pool" if contexts[name] in drawn else "retention_held_out"].append(acc)
    return {k: float(np.mean(v)) if v else None for k, v in parts.items()}


# --------------------------------------------------------------------------------------------------
# Whole evaluation of an HF model folder (behind `scripts/eval.py`; the report is written by the
# harness, `experiments.eval_report`). Its imports are local so that this section stays an appendix.
# --------------------------------------------------------------------------------------------------

# The keys of `evaluate_context` that accept a value from `evaluate_checkpoint(**eval_kwargs)`.
EVAL_KWARGS = (
    "examples",
    "max_new_tokens",
    "temperature",
    "samples",
    "coupled_views",
    "placement",
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
    from ctxjax.hf import HFFolderError, check_model_folder, read_architecture

    try:
        check_model_folder(path, what)
        read_architecture(path)  # an unsupported config, named before any weight is read
    except HFFolderError as e:
        raise InputError(str(e)) from None


def _resolve_task(task_name: str, context: str, task_options: dict | None):
    """The task and the name of the context evaluated. For "jsonl" (a user's records: task options
    `eval_file`, `context`, `verifier`, ...), an empty `context` means the file's only one."""
    from ctxjax.tasks import get_task
    from ctxjax.tasks.jsonl import JsonlTask

    try:
        if task_name == "jsonl":
            task = JsonlTask(**(task_options or {}))
        else:
            task = get_task(task_name, **(task_options or {}))
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise InputError(str(e).splitlines()[0] if str(e) else repr(e)) from None
    valid = task.contexts()
    if task_name == "jsonl" and not context:
        if len(valid) != 1:
            raise InputError(f"the records hold {len(valid)} contexts: pick one of {sorted(valid)}")
        return task, next(iter(valid))
    if context not in valid:
        raise InputError(
            f"unknown context {context!r} for task {task_name!r}; valid: {sorted(valid)}"
        )
    return task, context


def _eval_settings(eval_kwargs: dict) -> dict:
    from ctxjax.config import EvalConfig

    unknown = sorted(set(eval_kwargs) - set(EVAL_KWARGS))
    if unknown:
        raise InputError(f"unknown evaluation setting(s) {unknown}; valid: {list(EVAL_KWARGS)}")
    defaults = {k: v for k, v in dataclasses.asdict(EvalConfig()).items() if k in EVAL_KWARGS}
    settings = {
        **defaults,
        "retention": True,
        "with_cosine": True,
        "placement": "system",
        **eval_kwargs,
    }
    from ctxjax.hf import CHAT_PLACEMENTS

    if settings["placement"] not in CHAT_PLACEMENTS:
        raise InputError(
            f"placement must be one of {list(CHAT_PLACEMENTS)}, got {settings['placement']!r}"
        )
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
    task, context = _resolve_task(task_name, context, task_options)
    settings = _eval_settings(eval_kwargs)

    def run(path: str) -> dict:
        model = hf.load_model(path, param_dtype=param_dtype)
        tokenizer = hf.load_tokenizer(tokenizer_path or path)
        result = evaluate_context(model, tokenizer, task, context, **settings)
        return {
            "model": os.path.abspath(path),
            "task": task_name,
            "context_text": task.contexts()[context],
            "task_options": dict(task_options or {}),
            "settings": settings,
            **result,
        }

    result = run(model_path)
    if baseline_path is None:
        return result
    return {**result, "baseline": run(baseline_path)}
