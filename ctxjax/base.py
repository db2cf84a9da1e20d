"""Builds (or reuses) a tiny base model that reads contexts: the CPU-scale starting point.

Supervised fine-tuning from scratch on a task's `sft_records` mixture (every context, and no
context), so that the model's answers depend on its context the way a real instruction-tuned model's
do. The result is an ordinary HF folder (config.json, model.safetensors, tokenizer files), cached
under `cache_dir/<key>` where the key hashes everything that determines it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ctxjax import hf
from ctxjax.config import BaseModelConfig, OptimConfig
from ctxjax.model import DEFAULT_NUMERICS, ModelConfig, Numerics, create_model
from ctxjax.padding import pad_left
from ctxjax.step import make_optimizer
from ctxjax.tasks import get_task
from ctxjax.vocab import build_tokenizer

log = logging.getLogger(__name__)
DONE_FILE = "ctxjax_base.json"


def _key_numerics(numerics: Numerics) -> dict:
    return {k: v for k, v in dataclasses.asdict(numerics).items() if k != "scan_layers"}


def base_key(
    task_name: str,
    task_options: dict,
    model_cfg: ModelConfig,
    base_cfg: BaseModelConfig,
    seed: int,
    numerics: Numerics = DEFAULT_NUMERICS,
) -> str:
    blob = json.dumps(
        dict(
            task=task_name,
            options=task_options,
            # One flat section, as when the numerics were ModelConfig fields: the same keys as ever.
            # scan_layers only changes the parameter layout (same numbers; tests/test_scan.py), and
            # the base is saved per layer either way, so it does not name another base.
            model={**dataclasses.asdict(model_cfg), **_key_numerics(numerics)},
            base={
                k: v
                for k, v in dataclasses.asdict(base_cfg).items()
                if k not in ("cache_dir", "seed")
            },
            seed=seed,
            version=1,
        ),
        sort_keys=True,
        default=list,
    )
    return f"{task_name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def tokenizer_corpus(task: Any, records: list[dict]) -> list[str]:
    texts = list(task.contexts().values())
    for r in records:
        texts += [r["prompt"], r.get("answer", ""), r.get("context", "")]
    return texts


def encode_sft(tokenizer: Any, records: list[dict], max_len: int | None = None):
    """`[c | x | answer EOS]` left-padded, with a loss mask on the answer and its EOS."""
    (eos_id, *_), pad_id = hf.eos_and_pad(tokenizer)
    seqs, loss_masks = [], []
    for r in records:
        prompt = hf.render_chat(tokenizer, r.get("context", ""), r["prompt"])
        answer = tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        answer = [*answer, eos_id]
        seqs.append(prompt + answer)
        loss_masks.append([0] * len(prompt) + [1] * len(answer))
    width = max_len or max(map(len, seqs))
    if max(map(len, seqs)) > width:
        raise ValueError(f"an SFT sequence is longer than {width} tokens")
    ids, mask = pad_left(seqs, width, pad_id)
    loss_mask, _ = pad_left(loss_masks, width, 0)
    return ids, mask, loss_mask.astype(bool)


def _sft_step(graphdef, tx):
    @jax.jit
    def step(params, opt_state, ids, mask, loss_mask):
        def loss_fn(p):
            model = nnx.merge(graphdef, p, copy=True)
            logits = model(ids[:, :-1], attention_mask=mask[:, :-1])
            logp = jax.nn.log_softmax(logits, axis=-1)
            nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            m = loss_mask[:, 1:].astype(jnp.float32)
            return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _run_sft(step, params, opt_state, arrays, base_cfg: BaseModelConfig, seed: int, progress: bool):
    """`base_cfg.sft_steps` steps on batches drawn from the encoded records `arrays` (ids, mask,
    loss mask): (the trained params, the loss every 100 steps and at the last)."""
    ids, mask, loss_mask = arrays
    rng = np.random.default_rng(seed)
    losses = []
    iterator = range(base_cfg.sft_steps)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="base model SFT", mininterval=2.0)
    lengths = mask.sum(axis=1)
    for i in iterator:
        idx = rng.integers(0, len(ids), base_cfg.batch_size)
        # Rows are left-padded to the longest record; cut each batch to its own longest row rounded
        # up to a multiple of 16: short batches cost less, and only a few widths ever compile.
        width = min(ids.shape[1], -(-int(lengths[idx].max()) // 16) * 16)
        cut = slice(ids.shape[1] - width, None)
        params, opt_state, loss = step(
            params, opt_state, ids[idx, cut], mask[idx, cut], loss_mask[idx, cut]
        )
        if i % 100 == 0 or i == base_cfg.sft_steps - 1:
            losses.append(float(loss))
    return params, losses


def train_base(
    task: Any,
    model_cfg: ModelConfig,
    base_cfg: BaseModelConfig,
    out_dir: str,
    seed: int = 0,
    progress: bool = True,
    numerics: Numerics = DEFAULT_NUMERICS,
) -> dict:
    """Trains the base model from scratch on the task's SFT mixture and saves an HF folder."""
    t0 = time.time()
    records = task.sft_records(base_cfg.sft_examples, seed)
    tokenizer = build_tokenizer(tokenizer_corpus(task, records), vocab_size=base_cfg.vocab_size)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"the task's tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
            f"{model_cfg.vocab_size}; raise model.vocab_size"
        )
    ids, mask, loss_mask = encode_sft(tokenizer, records)
    model = create_model(model_cfg, seed=seed, numerics=numerics)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(
        OptimConfig(
            learning_rate=base_cfg.learning_rate, warmup_steps=50, weight_decay=0.01, grad_clip=1.0
        ),
        base_cfg.sft_steps,
    )
    step = _sft_step(graphdef, tx)
    params, losses = _run_sft(
        step, params, tx.init(params), (ids, mask, loss_mask), base_cfg, seed, progress
    )
    model = nnx.merge(graphdef, params)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_model(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    info = dict(
        task=task.name,
        sft_steps=base_cfg.sft_steps,
        final_sft_loss=losses[-1],
        sft_loss_curve=losses,
        seconds=round(time.time() - t0, 1),
        num_params=model_cfg.num_params(),
    )
    # Written last: a folder without it is an interrupted build and is rebuilt.
    with open(os.path.join(out_dir, DONE_FILE), "w") as f:
        json.dump(info, f, indent=2)
    return info


@contextlib.contextmanager
def _build_lock(path: str):
    """Holds an exclusive lock on `path`.lock: processes that need the same base model at once (a
    reproduction's parallel runs) build it once, the others wait and reuse it. The lock is the
    kernel's (flock), so a killed builder releases it and the next one rebuilds the folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def build_or_reuse_base(
    task_name: str,
    task_options: dict,
    model_cfg: ModelConfig,
    base_cfg: BaseModelConfig,
    seed: int = 0,
    progress: bool = True,
    numerics: Numerics = DEFAULT_NUMERICS,
) -> str:
    """The cached base model's folder for this task, model and numerics; trained if missing."""
    key = base_key(task_name, task_options, model_cfg, base_cfg, seed, numerics)
    path = os.path.join(base_cfg.cache_dir, key)
    with _build_lock(path):
        if os.path.exists(os.path.join(path, DONE_FILE)):
            log.info("reusing base model %s", path)
            return path
        task = get_task(task_name, **task_options)
        info = train_base(
            task, model_cfg, base_cfg, path, seed=seed, progress=progress, numerics=numerics
        )
    log.info(
        "built base model %s in %.0fs (final SFT loss %.3f)",
        path,
        info["seconds"],
        info["final_sft_loss"],
    )
    return path
