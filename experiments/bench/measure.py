"""Measuring the benchmarks of `scripts/bench.py`: each returns a JSON-ready dict and prints nothing
(`experiments.bench.report` prints and writes them).

torch and transformers are imported inside the functions that compare against them: they are
test/bench-only dependencies, never needed to train or sample.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import statistics
import tempfile
import time

import numpy as np

from ctxjax.config import MODEL_SIZES
from ctxjax.host_memory import process_allocator
from experiments.bench import kernels
from experiments.environment import cpu_id, cpu_model, usable_cores

# measure_sample: a tiny Llama, big enough that the decode step is real work on a CPU.
SAMPLE_MODEL = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
# Random weights at HF's std 0.02 give near-uniform logits whose argmax flips on float rounding;
# std 0.1 spreads the logits over several units so the two implementations can agree token for
# token.
SAMPLE_INIT_STD = 0.1


def weight_stream_rate(
    batch: int = 8, width: int = 256, mats: int = 16, reps: int = 100, calls: int = 5
) -> float:
    """Bytes/s at which a jitted loop of `x[batch, width] @ W[width, 4*width]` streams its weights.

    `mats` distinct fp32 matrices (1 MiB each at width 256, 16 MiB in all: more than the caches of
    a small CPU) are multiplied in turn, `reps` times inside one `fori_loop`, so the rate is that of
    the decode step's own kind of matmul (a few rows against a large weight matrix), launch
    overheads included. The median of `calls` timed calls.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    ws = [
        jnp.asarray(rng.normal(0, 0.01, (width, 4 * width)).astype(np.float32)) for _ in range(mats)
    ]

    @jax.jit
    def loop(x, ws):
        def body(_, x):
            for w in ws:
                x = x + (x @ w)[:, :width] * 1e-3
            return x

        return jax.lax.fori_loop(0, reps, body, x)

    x = jnp.ones((batch, width), jnp.float32)
    jax.block_until_ready(loop(x, ws))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(x, ws))
        times.append(time.perf_counter() - t0)
    return mats * reps * ws[0].nbytes / statistics.median(times)


def memory_read_rate(total_bytes: int = 2**30, arrays: int = 8, calls: int = 5) -> float:
    """Bytes/s of a plain read from memory: a jitted sum over `arrays` distinct fp32 arrays of
    `total_bytes` in all (1 GiB: more than the caches of any CPU this runs on), the fastest of
    `calls` calls after a warm-up (load can only slow a call).

    `weight_stream_rate` is the rate of a decode-shaped product over 16 MiB, which a CPU with a
    large last-level cache serves from cache, and which is a kernel's rate, not the memory's
    (either can be the faster: docs/notes.md). A floor that claims what no implementation can
    beat divides bytes by the faster of the two."""
    import jax
    import jax.numpy as jnp

    each = total_bytes // arrays // 4
    xs = [jnp.full((each,), i, jnp.float32) for i in range(arrays)]
    read = jax.jit(lambda xs: sum(jnp.sum(x) for x in xs))
    seconds = kernels.fastest_call(lambda: jax.block_until_ready(read(xs)), calls)
    return arrays * each * 4 / seconds


def decode_bytes(cfg, numerics, batch: int, cache_slots: int) -> dict:
    """Bytes one decode step must read at least: the weights `sampling.sample` feeds its decode
    loop, which casts them once per rollout (`model.cast_for_compute`: dense kernels and the
    embedding table in the compute dtype, norm scales as stored), so float32-stored weights are
    read at full width once, not on each of the N steps; an untied embedding table only one row per
    token, not counted (a tied one is the unembedding, read whole); and every layer's K and V cache
    over all `cache_slots`, in the compute dtype (the attention reads the whole cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ctxjax.model import cast_for_compute, create_model

    shapes = jax.eval_shape(
        lambda: cast_for_compute(nnx.state(create_model(cfg, 0, numerics), nnx.Param), numerics)
    )
    w_bytes = sum(
        x.size * x.dtype.itemsize
        for path, x in jax.tree_util.tree_leaves_with_path(shapes)
        if cfg.tie_embeddings or "embed_tokens" not in jax.tree_util.keystr(path)
    )
    kv = cfg.num_layers * 2 * batch * cfg.num_kv_heads * cache_slots * cfg.resolved_head_dim
    kv_bytes = kv * jnp.dtype(numerics.compute).itemsize
    return {"weights": w_bytes, "kv_cache": kv_bytes, "total": w_bytes + kv_bytes}


def _timing(times_s: list[float], tokens: int) -> dict:
    median = statistics.median(times_s)
    return {
        "times_s": [round(t, 5) for t in times_s],
        "median_s": round(median, 5),
        "best_s": round(min(times_s), 5),
        "tokens_per_s": round(tokens / median, 1),
    }


def measure_sample(
    *,
    batch: int = 8,
    prompt_len: int = 16,
    new_tokens: int = 64,
    reps: int = 5,
    seed: int = 0,
    hf_threads: tuple[int, ...] | None = None,
    hf_skip_s: float = 10.0,
) -> dict:
    """Greedy decoding tokens/s: `ctxjax.sampling.generate` vs transformers `generate()` (torch
    CPU).

    Both run the same random HF Llama (saved with `save_pretrained`, loaded by
    `ctxjax.hf.load_model`) on the same prompts (no padding, no EOS, `min_new_tokens` so HF cannot
    stop early). Each side is warmed up once (ours: the compile, reported as `compile_s` = first
    call minus the median call), then timed `reps` times, alternating ours / theirs so that load
    from other processes hits both alike. Tokens/s counts generated tokens (batch x new_tokens)
    over the median wall time of a call.

    torch runs at each thread count in `hf_threads` (default: 1 and torch's default). On a shared
    CPU torch's multi-threaded kernels can be ~50x slower than single-threaded (its threads wait on
    a descheduled peer), so the transformers baseline is the *fastest* setting (the ratio is the
    conservative one); a setting whose warm-up call exceeds `hf_skip_s` seconds is reported, not
    timed.
    """
    import torch

    default_threads = torch.get_num_threads()
    hf_threads = tuple(dict.fromkeys(hf_threads or (1, default_threads)))
    prompts = np.random.default_rng(seed).integers(
        0, SAMPLE_MODEL["vocab_size"], (batch, prompt_len)
    )
    hf_model, ours_model = _sample_models(seed)
    try:
        timed_runs = _time_sample_sides(
            ours_model, hf_model, prompts, new_tokens, hf_threads, reps, hf_skip_s
        )
    finally:
        torch.set_num_threads(default_threads)
    ours_tokens, first_call_s, hf_tokens, hf_warmup, ours_times, hf_times, load = timed_runs
    n_tok = batch * new_tokens
    ours = _timing(ours_times, n_tok)
    ours["compile_s"] = round(first_call_s - ours["median_s"], 3)
    per_threads = {
        str(th): (
            _timing(hf_times[th], n_tok)
            if th in hf_times
            else {"skipped": f"warm-up call took {hf_warmup[th]:.1f} s > {hf_skip_s} s"}
        )
        for th in hf_threads
    }
    if not hf_times:
        raise RuntimeError(f"every transformers setting was skipped: {per_threads}")
    best = min(hf_times, key=lambda th: per_threads[str(th)]["median_s"])
    theirs = dict(per_threads[str(best)], torch_threads=best)
    same = {str(th): bool(np.array_equal(ours_tokens, hf_tokens[th])) for th in hf_threads}
    return {
        "benchmark": "sample",
        "setup": _sample_setup(batch, prompt_len, new_tokens, reps, load),
        "ctxjax": ours,
        "transformers": theirs,
        "transformers_by_threads": per_threads,
        "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
        "tokens_identical": all(same.values()),
        "tokens_identical_by_threads": same,
        "memory_floor": _sample_memory_floor(
            ours_model, batch, prompt_len, new_tokens, ours, theirs
        ),
    }


def _sample_setup(batch, prompt_len, new_tokens, reps, load) -> dict:
    """What the sampling benchmark ran: sizes, decoding, versions and the machine's load."""
    import jax
    import torch
    import transformers

    return {
        "model": SAMPLE_MODEL,
        "init_std": SAMPLE_INIT_STD,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "reps": reps,
        "decoding": "greedy",
        "jax_backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "jax": jax.__version__,
        # Other processes on the machine skew both sides; the 1-minute load average
        # before and after the timed loop says how busy it was.
        "load_avg_1min": [round(load[0], 2), round(load[1], 2)],
    }


def _sample_models(seed: int) -> tuple:
    """(transformers model, the same weights loaded by `ctxjax.hf.load_model`): a random HF Llama
    of `SAMPLE_MODEL`'s shape, saved with `save_pretrained` and read back."""
    import torch
    import transformers

    from ctxjax import hf

    with tempfile.TemporaryDirectory() as tmp:
        # eos_token_id None: no EOS anywhere, so neither side can end a row early.
        hf_cfg = transformers.LlamaConfig(
            **SAMPLE_MODEL,
            initializer_range=SAMPLE_INIT_STD,
            tie_word_embeddings=False,
            eos_token_id=None,
            bos_token_id=None,
            pad_token_id=0,
        )
        torch.manual_seed(seed)
        hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
        hf_model.save_pretrained(tmp)
        return hf_model, hf.load_model(tmp)


def _time_sample_sides(ours_model, hf_model, prompts, new_tokens, hf_threads, reps, hf_skip_s):
    """Both sides warmed up, then timed `reps` times alternating (ours, then transformers at each
    thread setting whose warm-up took at most `hf_skip_s`). Returns (our tokens, our first call's
    seconds, {threads: their tokens}, {threads: warm-up seconds}, our times, {timed threads: their
    times}, (load average before, after))."""
    import torch

    from ctxjax.sampling import generate

    prompt_len = prompts.shape[1]

    def run_ours():
        return generate(ours_model, prompts.tolist(), max_new_tokens=new_tokens).tokens_BxN

    ids = torch.from_numpy(prompts.astype(np.int64))

    @torch.no_grad()
    def run_hf(threads):
        torch.set_num_threads(threads)
        out = hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return out[:, prompt_len:].numpy()

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        return out, time.perf_counter() - t0

    ours_tokens, first_call_s = timed(run_ours)
    hf_tokens, hf_warmup = {}, {}
    for th in hf_threads:
        hf_tokens[th], hf_warmup[th] = timed(run_hf, th)
    timed_threads = [th for th in hf_threads if hf_warmup[th] <= hf_skip_s]
    load_before = os.getloadavg()[0]
    ours_times, hf_times = [], {th: [] for th in timed_threads}
    for _ in range(reps):
        ours_times.append(timed(run_ours)[1])
        for th in timed_threads:
            hf_times[th].append(timed(run_hf, th)[1])
    load = (load_before, os.getloadavg()[0])
    return ours_tokens, first_call_s, hf_tokens, hf_warmup, ours_times, hf_times, load


def _sample_memory_floor(ours_model, batch, prompt_len, new_tokens, ours, theirs) -> dict:
    """The decode-only floor memory traffic sets (the prefill not counted, so the real ceiling is
    lower still): bytes a decode step must read over the faster of two rates measured here, under
    the timing's conditions: weights streamed into small-batch matmuls (16 MiB: in cache where the
    cache is that large) and a plain read of 1 GiB. A floor is what nothing beats, so the faster
    one, as the step's floors take it."""
    from ctxjax.sampling import bucket_length

    stream_bps = weight_stream_rate(batch=batch)
    read_bps = memory_read_rate()
    floor_bps = max(stream_bps, read_bps)
    slots = bucket_length(prompt_len) + bucket_length(new_tokens)
    step_bytes = decode_bytes(ours_model.cfg, ours_model.numerics, batch, slots)["total"]
    floor_step_s = step_bytes / floor_bps
    return {
        "weight_stream_gb_per_s": round(stream_bps / 1e9, 2),
        "read_gb_per_s": round(read_bps / 1e9, 2),
        "floor_gb_per_s": round(floor_bps / 1e9, 2),
        "bytes_per_decode_step": step_bytes,
        "floor_ms_per_step": round(1e3 * floor_step_s, 3),
        "ctxjax_ms_per_step": round(1e3 * ours["median_s"] / new_tokens, 3),
        "floor_tokens_per_s": round(batch / floor_step_s, 1),
        "floor_speedup": round(batch / floor_step_s / theirs["tokens_per_s"], 2),
    }


# --------------------------------------------------------------------------------------------------
# measure_train: where the time of one OPD + NCA step goes, and the memory of its loss
# --------------------------------------------------------------------------------------------------

# Part 1 (timing). "small" is the CPU default run (`RunConfig`'s model and data sizes); rollouts run
# the full budget (no EOS) so every step does the same work.
TRAIN_PRESETS = {
    "quick": dict(
        model=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
        ),
        batch=4,
        prompt_len=8,
        ctx_prompt_len=12,
        new_tokens=4,
    ),
    "small": dict(
        model=dict(vocab_size=320, **MODEL_SIZES["medium"]),  # the CPU default run's model
        batch=32,
        prompt_len=32,
        ctx_prompt_len=48,
        new_tokens=16,
    ),
    "medium": dict(
        model=dict(
            vocab_size=2048,
            hidden_size=128,
            intermediate_size=512,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
        ),
        batch=32,
        prompt_len=64,
        ctx_prompt_len=96,
        new_tokens=32,
    ),
}
# Part 2 (memory). The vocabulary is what matters: a narrow model with a 32k vocabulary, so the
# [B, N, V] logits dwarf the transformer's own activations.
TRAIN_MEMORY = {
    "full": dict(
        model=dict(
            vocab_size=32768,
            hidden_size=256,
            intermediate_size=1024,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
        ),
        batch=4,
        context_len=128,
        prompt_len=128,
        new_tokens=256,
        step_chunks=(0, 32, 64),
        loss_chunks=(0, 16, 32, 64),
    ),
    "quick": dict(
        model=dict(
            vocab_size=2048,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
        ),
        batch=2,
        context_len=8,
        prompt_len=8,
        new_tokens=32,
        # No whole-step compile (the costliest item, ~5-10 s on 2 shared cores): quick
        # mode exists for a < 30 s test.
        step_chunks=(),
        loss_chunks=(0, 8),
    ),
}
# Quick mode compiles with XLA's cheap backend settings: compiling is nearly all of its cost, and
# these LLVM options change neither the HLO nor its buffer assignment (so not the memory figures).
QUICK_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
MATMUL_PEAK_SHAPE = (1024, 1024, 1024)  # M, N, K of the fp32 matmul that measures the CPU's peak
LOSS_MEMORY_TARGET = 1 / 3  # loss temporaries at most this fraction of the full fp32 logits


def _block(tree):
    import jax

    return jax.tree.map(lambda x: x.block_until_ready(), tree)


def _host_cost(fn, *args) -> tuple[object, tuple[int, float]]:
    """`fn(*args)` and the minor page faults and system seconds it took (this process, all
    threads): the kernel's share of a step, invisible in its FLOPs."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = fn(*args)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return out, (after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime)


def _time_call(fn, *args) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = _block(fn(*args))
    return out, time.perf_counter() - t0


def _xla_flops(compiled) -> float:
    """XLA's cost-analysis FLOPs (a dict, or a one-element list of dicts in older jax).

    XLA counts a while/scan body once, not once per trip: loops must be corrected by the caller.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _memory(compiled, full_logits_bytes: int) -> dict:
    m = compiled.memory_analysis()
    return {
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_over_full_logits": round(m.temp_size_in_bytes / full_logits_bytes, 4),
    }


def _train_batch(
    rng: np.random.Generator, vocab: int, batch: int, prompt_len: int, ctx_prompt_len: int
) -> dict:
    """Left-padded random `[x]` and `[c|x]` (uneven lengths, so padding is exercised)."""

    def pad(seqs, width):
        ids, mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), bool)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :], mask[i, width - len(s) :] = s, True
        return ids, mask

    prompts = [
        rng.integers(1, vocab, rng.integers(max(1, prompt_len // 2), prompt_len + 1))
        for _ in range(batch)
    ]
    ctx = [
        np.concatenate([rng.integers(1, vocab, rng.integers(1, ctx_prompt_len - len(x) + 1)), x])
        for x in prompts
    ]
    (ids_x, mask_x), (ids_c, mask_c) = pad(prompts, prompt_len), pad(ctx, ctx_prompt_len)
    return dict(prompt_ids=ids_x, prompt_mask=mask_x, ctx_prompt_ids=ids_c, ctx_prompt_mask=mask_c)


def _forward_flops(cfg, rows: int, queries: int, keys: int, projected: int) -> int:
    """Matmul FLOPs of one forward: `queries` slots per row attending to `keys` slots (the model
    computes every query x key score, masked or not), `projected` positions per row unembedded."""
    d, f, h, k, dh = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.resolved_head_dim,
    )
    per_token = 2 * (d * h * dh + 2 * d * k * dh + h * dh * d) + 2 * 3 * d * f + 4 * h * dh * keys
    return rows * (cfg.num_layers * queries * per_token + projected * 2 * d * cfg.vocab_size)


def _step_flops_analytic(cfg, b: int, p: int, q: int, n: int, loss_cfg) -> dict:
    """Matmul FLOPs of one train step by part (backward = 2x forward; embedding gathers, softmaxes
    and the optimizer's elementwise work are left out)."""
    sample = _forward_flops(cfg, b, p, p + n, 1) + (n - 1) * _forward_flops(cfg, b, 1, p + n, 1)
    proj = 2 * b * n * cfg.hidden_size * cfg.vocab_size  # one [B, N, D] x [D, V] projection
    remat = 1 if 0 < loss_cfg.chunk_size < n else 0  # chunked loss recomputes its logits
    views = 2 if loss_cfg.uses_consistency else 1
    teacher = _forward_flops(cfg, b, q + n, q + n, 0) + (1 + remat) * proj
    student = (
        3
        * (
            _forward_flops(cfg, b, p + n, p + n, 0)
            + (_forward_flops(cfg, b, q + n, q + n, 0) if views == 2 else 0)
        )
        + views * (3 + remat) * proj
    )
    return {
        "sample": sample,
        "teacher": teacher,
        "student": student,
        "total": sample + teacher + student,
    }


def _timed_peak_matmul():
    """A call timing one call of the jitted fp32 `MATMUL_PEAK_SHAPE` matmul (compiled and warmed
    up once, here), in seconds."""
    import jax
    import jax.numpy as jnp

    m, n, k = MATMUL_PEAK_SHAPE
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    _time_call(matmul, a, b)
    return lambda: _time_call(matmul, a, b)[1]


def _peak_matmul(reps: int) -> dict:
    m, n, k = MATMUL_PEAK_SHAPE
    timed = _timed_peak_matmul()
    times = [timed() for _ in range(reps)]
    median = statistics.median(times)
    return {
        "shape_mnk": [m, n, k],
        "times_s": [round(t, 5) for t in times],
        "median_s": round(median, 5),
        "flops_per_s": 2 * m * n * k / median,
        "best_flops_per_s": 2 * m * n * k / min(times),
    }


def _peak_matmul_torch(reps: int) -> dict:
    """The same matmul in torch (MKL/oneDNN GEMMs on this CPU), with torch's current threads: the
    machine can run at least this fast, so the roofline uses the faster of the two peaks."""
    import torch

    m, n, k = MATMUL_PEAK_SHAPE
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return {"times_s": [round(t, 5) for t in times], "best_flops_per_s": 2 * m * n * k / min(times)}


# The step-time ratios the project targets for `measure_step`'s configs (PyTorch way / ctxjax).
STEP_TARGETS = {"b": 1.3, "c": 1.2}


def step_roofline(
    case: StepCase, flops: dict, peak_flops_per_s: float, stream_bytes_per_s: float
) -> dict:
    """The fastest the step could run on this machine, whatever the implementation: sampling at
    the larger of its memory floor (each decode step reads every weight and the KV cache, at
    `stream_bytes_per_s`: `measure_step` passes the faster of the weight-streaming and the plain
    read rate) and its matmul FLOPs at the peak, plus the teacher's and the
    student's matmul FLOPs at the peak. The optimizer and everything else count as free, so the
    bound is optimistic: a target slower than it is physically out of reach here."""
    from ctxjax.model import DEFAULT_NUMERICS, ModelConfig

    cfg = ModelConfig(**case.model)
    slots = case.prompt_len + case.new_tokens
    read = decode_bytes(cfg, DEFAULT_NUMERICS, case.batch, slots)["total"]
    decode_s = case.new_tokens * read / stream_bytes_per_s
    sample_s = max(decode_s, flops["sample"] / peak_flops_per_s)
    rest_s = (flops["teacher"] + flops["student"]) / peak_flops_per_s
    return {
        "sample_floor_s": sample_s,
        "decode_memory_floor_s": decode_s,
        "teacher_student_floor_s": rest_s,
        "step_floor_s": sample_s + rest_s,
    }


def _train_parts(
    graphdef, teacher_graphdef, tx, new_tokens: int, method, loss_cfg, copts: dict | None
):
    """The step's parts, each its own jitted function: sampling, the teacher's hidden states and
    logits (`step.teacher_targets`), value_and_grad of the student passes + loss
    (`step.make_student_loss`), the optax update."""
    import jax
    import optax
    from flax import nnx

    from ctxjax.sampling import sample
    from ctxjax.step import make_student_loss, teacher_targets

    @functools.partial(jax.jit, compiler_options=copts)
    def sample_part(params, ids, mask, rng):
        return sample(
            nnx.merge(graphdef, params),
            ids,
            mask,
            rng,
            max_new_tokens=new_tokens,
            method=method,
            eos_ids=(),
            pad_id=0,
        )

    @functools.partial(jax.jit, compiler_options=copts)
    def teacher_part(teacher_params, data):
        h_t, w_t = teacher_targets(teacher_graphdef, teacher_params, data)
        return h_t, w_t, nnx.merge(teacher_graphdef, teacher_params).logits(h_t)

    student_part = jax.jit(
        jax.value_and_grad(make_student_loss(graphdef, loss_cfg), has_aux=True),
        compiler_options=copts,
    )

    @functools.partial(jax.jit, compiler_options=copts)
    def optimizer_part(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return sample_part, teacher_part, student_part, optimizer_part


@dataclasses.dataclass
class _CtxjaxStep:
    """ctxjax's whole jitted step (compiled ahead of time, warmed up) and its parts jitted alone
    (`_train_parts`, each called once: their compile), on one fixed data batch."""

    step: object  # the compiled step; calls donate `state`
    graphdef: object
    params: object  # a copy of the student's initial parameters (the parts' input)
    state: object
    teacher_params: object
    batch: dict
    rng: object
    step_compile_s: float
    step_first_call_s: float  # the warm-up call after the compile (first execution)
    parts: dict  # name -> (jitted fn, args)
    firsts: dict  # name -> seconds of the first call (compile included)

    def run_step(self, rep: int) -> float:
        """One timed call of the whole step (a fresh rollout key per rep); keeps the new state."""
        import jax

        (self.state, _), dt = _time_call(
            self.step,
            self.state,
            self.teacher_params,
            self.batch,
            jax.random.fold_in(self.rng, rep),
        )
        return dt

    def run_parts(self) -> dict[str, float]:
        """One timed call of each part, in order, on the same inputs every time."""
        return {name: _time_call(fn, *args)[1] for name, (fn, args) in self.parts.items()}


def _first_step(step, state, teacher_params, batch, rng, copts: dict | None):
    """Compiles the jitted `step` ahead of time (for XLA's FLOPs; calls donate `state`) and makes
    its first call: (compiled step, new state, compile seconds, first call seconds)."""
    t0 = time.perf_counter()
    compiled = step.lower(state, teacher_params, batch, rng).compile(compiler_options=copts)
    compile_s = time.perf_counter() - t0
    (state, _), first_call_s = _time_call(compiled, state, teacher_params, batch, rng)
    return compiled, state, compile_s, first_call_s


def _step_setup(student, teacher, new_tokens: int, loss_cfg):
    """The train step of `student` distilled from `teacher` as the benchmarks run it (default
    optimizer, sampling at temperature 1 with no EOS), jitted: (step, graphdef, state, teacher
    graphdef, teacher params, optimizer, sampling method)."""
    from flax import nnx

    from ctxjax.config import OptimConfig, RolloutConfig
    from ctxjax.sampling import SamplingMethod
    from ctxjax.step import StepConfig, init_state, jit_train_step, make_optimizer, make_train_step

    rollout = RolloutConfig(max_new_tokens=new_tokens, temperature=1.0)
    step_cfg = StepConfig(
        loss=loss_cfg,
        optim=OptimConfig(),
        rollout=rollout,
        total_steps=1000,
        micro_batches=1,
        eos_ids=(),
        pad_id=0,
    )
    tx = make_optimizer(step_cfg.optim, step_cfg.total_steps)
    graphdef, state = init_state(student, tx)
    teacher_graphdef, teacher_params = nnx.split(teacher, nnx.Param)
    step = jit_train_step(make_train_step(graphdef, teacher_graphdef, tx, step_cfg))
    method = SamplingMethod(temperature=rollout.temperature)
    return step, graphdef, state, teacher_graphdef, teacher_params, tx, method


def _build_ctxjax_step(
    student, teacher, batch_np: dict, new_tokens: int, loss_cfg, seed: int, copts: dict | None
) -> _CtxjaxStep:
    """Compiles the step of `student` distilled from `teacher` (default optimizer, sampling at
    temperature 1 with no EOS) and its parts, and warms both up. The step donates the student's own
    parameter arrays: export the student before, never after.

    The whole step is compiled and called first, before any part: its first step is then the one a
    run meets after loading its weights (`bench.py train --model` reports it), not one flattered by
    compiles and calls of the parts before it in the same process."""
    import jax
    import jax.numpy as jnp

    from ctxjax.step import distill_batch

    step, graphdef, state, teacher_graphdef, teacher_params, tx, method = _step_setup(
        student, teacher, new_tokens, loss_cfg
    )
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    # The parts get their own copy: the whole step donates (and so consumes) its state.
    params, opt_state = jax.tree.map(jnp.copy, (state.params, state.opt_state))
    rng = jax.random.key(seed)
    step, state, step_compile_s, step_first_call_s = _first_step(
        step, state, teacher_params, batch, rng, copts
    )

    sample_part, teacher_part, student_part, optimizer_part = _train_parts(
        graphdef, teacher_graphdef, tx, new_tokens, method, loss_cfg, copts
    )

    rollout_out, sample_first = _time_call(
        sample_part, params, batch["prompt_ids"], batch["prompt_mask"], rng
    )
    data = distill_batch(batch, rollout_out.tokens_BxN, rollout_out.mask_BxN)
    count = jnp.maximum(data.resp_mask_BxN.sum(), 1).astype(jnp.float32)
    beta = jnp.float32(loss_cfg.beta)
    (h_t, w_t, _), teacher_first = _time_call(teacher_part, teacher_params, data)
    student_args = (params, data, h_t, w_t, beta, count)
    (_, grads), student_first = _time_call(student_part, *student_args)
    _, optimizer_first = _time_call(optimizer_part, grads, opt_state, params)
    return _CtxjaxStep(
        step=step,
        graphdef=graphdef,
        params=params,
        state=state,
        teacher_params=teacher_params,
        batch=batch,
        rng=rng,
        step_compile_s=step_compile_s,
        step_first_call_s=step_first_call_s,
        parts={
            "sample": (sample_part, (params, batch["prompt_ids"], batch["prompt_mask"], rng)),
            "teacher": (teacher_part, (teacher_params, data)),
            "student": (student_part, student_args),
            "optimizer": (optimizer_part, (grads, opt_state, params)),
        },
        firsts={
            "sample": sample_first,
            "teacher": teacher_first,
            "student": student_first,
            "optimizer": optimizer_first,
        },
    )


def _time_train_step(preset: dict, reps: int, seed: int, copts: dict | None) -> dict:
    """Part 1: the jitted step and its parts, each jitted on its own, timed in turn each rep."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ctxjax.config import LossConfig
    from ctxjax.model import ModelConfig, create_model, init_cache

    cfg = ModelConfig(**preset["model"])
    b, p, q, n = (
        preset["batch"],
        preset["prompt_len"],
        preset["ctx_prompt_len"],
        preset["new_tokens"],
    )
    loss_cfg = LossConfig()
    batch_np = _train_batch(np.random.default_rng(seed), cfg.vocab_size, b, p, q)
    run = _build_ctxjax_step(
        create_model(cfg, seed), create_model(cfg, seed + 1), batch_np, n, loss_cfg, seed, copts
    )
    graphdef, params = run.graphdef, run.params

    @jax.jit
    def decode_step(params, cache, tokens_B, positions_B):  # one trip of the sampler's while loop
        model = nnx.merge(graphdef, params)
        out = model.forward(tokens_B[:, None], positions_BxL=positions_B[:, None], cache=cache)
        return model.logits(out.hidden_BxLxD[:, 0])

    zeros_B = jnp.zeros(b, jnp.int32)
    decode_flops = _xla_flops(
        decode_step.lower(params, init_cache(cfg, b, p + n), zeros_B, zeros_B).compile(
            compiler_options=copts
        )
    )

    times, load_before, load_after = _time_step_and_parts(run, reps)

    tokens = b * n
    timing = {name: _timing(ts, tokens) for name, ts in times.items()}
    for name, row in timing.items():
        # The parts compile on their first call; the step was compiled ahead of time.
        compile_s = run.step_compile_s if name == "step" else run.firsts[name] - row["median_s"]
        row["compile_s"] = round(compile_s, 3)
        row["share_of_step"] = round(row["median_s"] / timing["step"]["median_s"], 4)
    for name in run.parts:  # tokens/s is a whole-step figure
        del timing[name]["tokens_per_s"]
    flops = {
        "analytic": _step_flops_analytic(cfg, b, p, q, n, loss_cfg),
        "xla_raw": _xla_flops(run.step),
        "xla_decode_step": decode_flops,
    }
    # The decode while loop runs n - 1 times but XLA counts its body once (Part 1 does not chunk the
    # loss, so there is no scan to correct for).
    flops["xla_loop_corrected"] = flops["xla_raw"] + (n - 2) * decode_flops
    return {
        "setup": {
            "model": preset["model"],
            "batch": b,
            "prompt_len": p,
            "ctx_prompt_len": q,
            "new_tokens": n,
            "temperature": 1.0,
            "eos": None,
            "loss": dataclasses.asdict(loss_cfg),
            "reps": reps,
            "num_params": cfg.num_params(),
            "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        },
        "timing": timing,
        "sum_of_parts_s": round(sum(timing[k]["median_s"] for k in run.parts), 5),
        "flops": flops,
    }


def _loss_memory(mem: dict, full_logits_bytes: int, copts: dict | None) -> dict:
    """Part 2 (b): value_and_grad of the loss alone, given [B, N, D] hidden states."""
    import jax
    import jax.numpy as jnp

    from ctxjax import losses
    from ctxjax.config import LossConfig
    from ctxjax.model import Unembedding
    from ctxjax.step import per_token_losses

    b, n = mem["batch"], mem["new_tokens"]
    d, v = mem["model"]["hidden_size"], mem["model"]["vocab_size"]
    out = {}
    for chunk in mem["loss_chunks"]:
        loss_cfg = LossConfig(chunk_size=chunk)

        def loss(h_nc, h_c, h_t, w_s, w_t, tokens, mask, loss_cfg=loss_cfg):
            # [D, V] arrays: the loss allocates the same whichever way the weight lies
            u_s, u_t = Unembedding(w_s, vocab_major=False), Unembedding(w_t, vocab_major=False)
            opd, cons, rkl = per_token_losses(loss_cfg, h_nc, h_c, h_t, u_s, u_t, tokens)
            return (
                losses.masked_mean(opd + loss_cfg.beta * cons, mask),
                losses.masked_sum(rkl, mask),
            )  # the step logs the reverse KL: keep it alive

        spec = jax.ShapeDtypeStruct
        args = (
            (spec((b, n, d), jnp.float32),) * 3
            + (spec((d, v), jnp.float32),) * 2
            + (spec((b, n), jnp.int32), spec((b, n), bool))
        )
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3), has_aux=True))
        out[str(chunk)] = _memory(
            fn.lower(*args).compile(compiler_options=copts), full_logits_bytes
        )
    return out


def _step_memory(mem: dict, full_logits_bytes: int, seed: int, copts: dict | None) -> dict:
    """Part 2 (a): the compiled whole train step (rollout of `new_tokens`) at each chunk size."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ctxjax.config import LossConfig, OptimConfig, RolloutConfig
    from ctxjax.model import ModelConfig, create_model
    from ctxjax.step import StepConfig, init_state, jit_train_step, make_optimizer, make_train_step

    cfg = ModelConfig(**mem["model"])
    b, c, p, n = mem["batch"], mem["context_len"], mem["prompt_len"], mem["new_tokens"]
    tx = make_optimizer(OptimConfig(), 1000)
    graphdef, state = init_state(create_model(cfg, seed), tx)
    teacher_graphdef, teacher_params = nnx.split(create_model(cfg, seed + 1), nnx.Param)
    batch = dict(
        prompt_ids=jnp.ones((b, p), jnp.int32),
        prompt_mask=jnp.ones((b, p), bool),
        ctx_prompt_ids=jnp.ones((b, c + p), jnp.int32),
        ctx_prompt_mask=jnp.ones((b, c + p), bool),
    )
    out = {}
    for chunk in mem["step_chunks"]:
        step_cfg = StepConfig(
            loss=LossConfig(chunk_size=chunk),
            optim=OptimConfig(),
            rollout=RolloutConfig(max_new_tokens=n),
            total_steps=1000,
            micro_batches=1,
            eos_ids=(),
            pad_id=0,
        )
        step = jit_train_step(make_train_step(graphdef, teacher_graphdef, tx, step_cfg))
        compiled = step.lower(state, teacher_params, batch, jax.random.key(seed)).compile(
            compiler_options=copts
        )
        out[str(chunk)] = _memory(compiled, full_logits_bytes)
    return out


def measure_train(
    *,
    preset: str = "small",
    quick: bool = False,
    reps: int = 5,
    seed: int = 0,
) -> dict:
    """Where one OPD + NCA train step spends its time, and how much memory its loss needs.

    Part 1 (`preset`, "small" = the CPU default run): the whole jitted `train_step` and each part
    jitted alone on the same inputs (sampling; teacher hidden states + logits; value_and_grad of the
    two student passes and the loss with the teacher's hidden states given; the optax update), timed
    in turn `reps` times after a warm-up; the median call, its share of the step's median, response
    tokens/s of the step, and the step's FLOPs (analytic matmul count and XLA's cost analysis) as a
    fraction of this machine's measured fp32 matmul rate.

    Part 2 (`TRAIN_MEMORY`): XLA's memory analysis of the compiled whole step and of the loss alone
    (given hidden states) with and without chunking, against the bytes of full fp32 logits of the
    three passes (`4 * B * V * (|c|+|x|+|y| + |x|+|y| + |c|+|x|+|y|)`).

    `quick` shrinks everything for a test (seconds, not minutes).
    """
    import jax

    if quick:
        preset = "quick"
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {sorted(TRAIN_PRESETS)}")
    reps = 2 if quick else reps
    mem = TRAIN_MEMORY["quick" if quick else "full"]
    copts = QUICK_COMPILER_OPTIONS if quick else None
    timed = _time_train_step(TRAIN_PRESETS[preset], reps, seed, copts)
    peak = _peak_matmul(reps=3 if quick else 10)
    step_s = timed["timing"]["step"]["median_s"]
    for name in ("analytic", "xla_loop_corrected"):
        flops = timed["flops"][name]["total"] if name == "analytic" else timed["flops"][name]
        timed["flops"][f"fraction_of_peak_{name}"] = round(flops / step_s / peak["flops_per_s"], 5)

    b, c, p, n, v = (
        mem["batch"],
        mem["context_len"],
        mem["prompt_len"],
        mem["new_tokens"],
        mem["model"]["vocab_size"],
    )
    full_logits = 4 * b * v * ((c + p + n) + (p + n) + (c + p + n))
    memory = {
        "setup": {k: list(x) if isinstance(x, tuple) else x for k, x in mem.items()},
        "full_logits_bytes": full_logits,
        "response_logits_bytes": 3 * 4 * b * n * v,  # the three passes, response slots only
        "target_ratio": round(LOSS_MEMORY_TARGET, 4),
        "train_step": _step_memory(mem, full_logits, seed, copts),
        "loss_only": _loss_memory(mem, full_logits, copts),
    }
    memory["target_met_chunks"] = [
        int(k)
        for k, row in memory["loss_only"].items()
        if int(k) and row["temp_over_full_logits"] <= LOSS_MEMORY_TARGET
    ]
    result = {
        "benchmark": "train",
        "preset": preset,
        "quick": quick,
        "environment": {
            "jax_backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "compiler_options": copts or {},
            "jax": jax.__version__,
            "load_avg_1min_end": round(os.getloadavg()[0], 2),
        },
        "time": timed,
        "peak_matmul": peak,
        "memory": memory,
    }
    return result


# --------------------------------------------------------------------------------------------------
# measure_step: ctxjax's whole step against the same step written the PyTorch way, side by side
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepCase:
    """One configuration of `measure_step`: a Llama-shaped model (`ModelConfig` fields) and the
    step's sizes; `[c | x]` is `context_len + prompt_len` slots wide."""

    label: str
    model: dict
    new_tokens: int
    batch: int = 8
    context_len: int = 32
    prompt_len: int = 16


# The benchmark's step configurations; "quick" is a tiny one for the test suite.
STEP_CASES = {
    "a": StepCase(
        "4 layers, hidden 256, vocab 512",
        dict(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=1024,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            tie_embeddings=False,
        ),
        new_tokens=64,
    ),
    "b": StepCase(
        "8 layers, hidden 512, inter 2048, vocab 8192 (42M)",
        dict(
            vocab_size=8192,
            hidden_size=512,
            intermediate_size=2048,
            num_layers=8,
            num_heads=8,
            num_kv_heads=8,
            tie_embeddings=False,
        ),
        new_tokens=64,
    ),
    "c": StepCase(
        "SmolLM2-135M shape (30 layers, hidden 576, 9/3 heads, inter 1536, vocab 49152)",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_embeddings=True,
            max_position_embeddings=8192,
        ),
        new_tokens=32,
    ),
    "quick": StepCase(
        "tiny (test)",
        dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            tie_embeddings=False,
        ),
        new_tokens=3,
        batch=2,
        context_len=4,
        prompt_len=4,
    ),
}
STEP_PARTS = ("sample", "teacher", "student", "optimizer")


def _time_step_and_parts(run, reps: int) -> tuple[dict, float, float]:
    """`reps` interleaved repetitions of the whole step and of each part alone: seconds per name,
    and the 1-minute load average before and after."""
    times = {name: [] for name in ("step", *run.parts)}
    load_before = os.getloadavg()[0]
    for rep in range(reps):
        times["step"].append(run.run_step(rep))
        for name, dt in run.run_parts().items():
            times[name].append(dt)
    return times, load_before, os.getloadavg()[0]


def _peak_fractions(flops: dict, medians: dict, peak_flops_per_s: float) -> dict:
    """FLOP rate / peak of the step and of each part with matmul FLOPs (not the optimizer)."""
    out = {"step": round(flops["total"] / medians["step"] / peak_flops_per_s, 5)}
    for name in ("sample", "teacher", "student"):
        out[name] = round(flops[name] / medians[name] / peak_flops_per_s, 5)
    return out


def _matmul_probe():
    """A call giving the fastest FLOP/s of 5 calls of the peak matmul (`_timed_peak_matmul`):
    one more chance per repetition of `_compare_case` to catch the machine at its fastest."""
    m, n, k = MATMUL_PEAK_SHAPE
    timed = _timed_peak_matmul()
    return lambda: 2 * m * n * k / min(timed() for _ in range(5))


def _side(times: dict[str, list[float]], tokens: int) -> dict:
    """Per-part timings of one implementation; tokens/s only for the whole step."""
    out = {name: _timing(ts, tokens) for name, ts in times.items()}
    for name in STEP_PARTS:
        del out[name]["tokens_per_s"]
    return out


FIRST_STEP_LATER_CALLS = 3  # calls of a first-step measurement after its first: its steady time


def first_step_here(case: StepCase, seed: int, copts: dict | None, loss_cfg, scan_layers: bool):
    """The step of `case` (`numerics.scan_layers` as given, student and teacher) in this process:
    its compile and first call (the first step a run waits for), then `FIRST_STEP_LATER_CALLS` more
    calls for its steady time. `fresh_first_step` runs it in a process of its own."""
    import jax
    import jax.numpy as jnp

    from ctxjax.model import ModelConfig, Numerics, create_model

    cfg, numerics = ModelConfig(**case.model), Numerics(scan_layers=scan_layers)
    student = create_model(cfg, seed, numerics=numerics)
    teacher = create_model(cfg, seed + 1, numerics=numerics)
    q = case.context_len + case.prompt_len
    batch_np = _train_batch(
        np.random.default_rng(seed), cfg.vocab_size, case.batch, case.prompt_len, q
    )
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    step, _, state, _, teacher_params, _, _ = _step_setup(
        student, teacher, case.new_tokens, loss_cfg
    )
    rng = jax.random.key(seed)
    compiled, state, compile_s, first_call_s = _first_step(
        step, state, teacher_params, batch, rng, copts
    )
    # Its steady time from several calls, as a training loop makes them (each on the last one's
    # state): one call is one sample of a machine whose speed drifts by tens of percent.
    later_s = []
    for i in range(FIRST_STEP_LATER_CALLS):
        (state, _), dt = _time_call(
            compiled, state, teacher_params, batch, jax.random.fold_in(rng, 1 + i)
        )
        later_s.append(round(dt, 3))
    return {
        "compile_s": round(compile_s, 3),
        "first_call_s": round(first_call_s, 3),
        "first_step_s": round(compile_s + first_call_s, 3),
        "later_calls_s": later_s,
        "later_call_median_s": statistics.median(later_s),
        "process_id": os.getpid(),  # whose first step it was (a fresh process's, on the page)
    }


def fresh_first_step(
    case: StepCase, seed: int, copts: dict | None, loss_cfg, scan_layers: bool
) -> dict:
    """`first_step_here` in a new Python process (`python -m experiments.bench.first_step`, the
    same environment: the preloaded allocator, XLA flags), as a run meets its first step. In the
    bench's own process it came out flattered, about half as long (docs/notes.md): the process's
    own warm-up (allocator arenas, kernel set-up) was already done."""
    import json
    import subprocess
    import sys

    spec = dict(
        case=dataclasses.asdict(case),
        seed=seed,
        copts=copts or {},
        loss=dataclasses.asdict(loss_cfg),
        scan_layers=scan_layers,
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.first_step", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the first-step process failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_both_steps(ours, ref, ref_batch, reps: int, seed: int) -> tuple:
    """Both steps timed `reps` times, alternating which goes first so other load hits both alike.
    Returns ({part: ctxjax's seconds}, {part: the PyTorch way's}, {side: (page faults, system
    seconds) of each timed step}, the matmul probe after each repetition, (load average before,
    after))."""
    ours_times = {name: [] for name in ("step", *STEP_PARTS)}
    ref_times = {name: [] for name in ("step", *STEP_PARTS)}
    host = {"ctxjax": [], "pytorch": []}  # (page faults, system seconds) of each timed step
    peak_probe, peaks = _matmul_probe(), []
    load_before = os.getloadavg()[0]
    for rep in range(reps):
        # Each timed step follows an untimed one of its own side, as a step follows a step in
        # training: right after the other library's step, ctxjax's step under glibc (which maps its
        # XLA temporaries afresh every call) ran slower than after its own, its page faults costing
        # seconds of system time (docs/notes.md).

        def run_ours(rep=rep):
            ours.run_step(reps + rep)  # untimed, its own rollout key
            dt, cost = _host_cost(ours.run_step, rep)
            ours_times["step"].append(dt)
            host["ctxjax"].append(cost)
            for name, dt in ours.run_parts().items():
                ours_times[name].append(dt)

        def run_ref(rep=rep):
            ref(ref_batch, seed + 1 + reps + rep)  # untimed
            times, cost = _host_cost(ref, ref_batch, seed + 1 + rep)
            host["pytorch"].append(cost)
            for name, dt in times.items():
                ref_times[name].append(dt)

        for run in (run_ours, run_ref) if rep % 2 == 0 else (run_ref, run_ours):
            run()
        peaks.append(peak_probe())
    load = (load_before, os.getloadavg()[0])
    return ours_times, ref_times, host, peaks, load


def _host_medians(costs: list[tuple[int, float]]) -> dict:
    """The median page faults and system seconds of a side's timed steps."""
    faults, system_s = zip(*costs, strict=True)
    return {
        "minor_faults_median": int(statistics.median(faults)),
        "system_s_median": round(statistics.median(system_s), 3),
    }


def _first_steps(case: StepCase, seed: int, copts: dict | None, loss_cfg, first_steps: int):
    """The first step a run waits for, each in a fresh process (`fresh_first_step`): (unrolled,
    measured once; scanned, the one with a target, `first_steps` times, since one measurement is one
    sample of a machine whose speed drifts by tens of percent over minutes)."""
    unrolled = fresh_first_step(case, seed, copts, loss_cfg, scan_layers=False)
    runs = [
        fresh_first_step(case, seed, copts, loss_cfg, scan_layers=True) for _ in range(first_steps)
    ]
    # The run with the median first step, so its compile, calls and first step belong together.
    scanned = dict(sorted(runs, key=lambda r: r["first_step_s"])[len(runs) // 2])
    scanned["first_steps_s"] = [r["first_step_s"] for r in runs]
    return unrolled, scanned


def _compare_case(
    case: StepCase, reps: int, seed: int, copts: dict | None, first_steps: int
) -> dict:
    """One configuration: both steps built on the same weights and data batch, warmed up, then
    timed `reps` times, alternating which goes first so other load hits both alike; then the
    scanned step's first step `first_steps` times (the median run kept, each one listed)."""
    from ctxjax import hf
    from ctxjax.config import LossConfig, OptimConfig
    from ctxjax.model import ModelConfig, create_model
    from experiments.bench import torch_step

    cfg = ModelConfig(**case.model)
    b, p, n = case.batch, case.prompt_len, case.new_tokens
    q = case.context_len + p
    loss_cfg = LossConfig(opd="reverse_kl", consistency="nca", beta=0.5)
    student, teacher = create_model(cfg, seed), create_model(cfg, seed + 1)
    batch_np = _train_batch(np.random.default_rng(seed), cfg.vocab_size, b, p, q)
    # The PyTorch way loads the same weights; exported first, since ctxjax's step donates them.
    with tempfile.TemporaryDirectory() as tmp:
        ref = torch_step.TorchStep(
            student=torch_step.load(hf.save_model(student, os.path.join(tmp, "student"))),
            teacher=torch_step.load(hf.save_model(teacher, os.path.join(tmp, "teacher"))),
            optim=OptimConfig(),
            beta=loss_cfg.beta,
            new_tokens=n,
        )
    ref_batch = torch_step.torch_batch(batch_np)
    ours = _build_ctxjax_step(student, teacher, batch_np, n, loss_cfg, seed, copts)
    t0 = time.perf_counter()
    ref(ref_batch, seed)  # warm-up (allocator, thread pool)
    ref_first_s = time.perf_counter() - t0

    ours_times, ref_times, host, peaks, load = _time_both_steps(ours, ref, ref_batch, reps, seed)

    tokens = b * n
    sides = {"ctxjax": _side(ours_times, tokens), "pytorch": _side(ref_times, tokens)}
    for side, costs in host.items():
        sides[side]["step"].update(_host_medians(costs))
    sides["ctxjax"]["step"]["compile_s"] = round(ours.step_compile_s, 3)
    ours = None  # its buffers, before the first-step processes allocate their own
    unrolled, scanned = _first_steps(case, seed, copts, loss_cfg, first_steps)
    sides["pytorch"]["step"]["first_call_s"] = round(ref_first_s, 3)
    flops = _step_flops_analytic(cfg, b, p, q, n, loss_cfg)
    medians = {
        side: {name: row["median_s"] for name, row in timing.items()}
        for side, timing in sides.items()
    }
    return {
        "label": case.label,
        "setup": {
            **dataclasses.asdict(case),
            "ctx_prompt_len": q,
            "num_params": cfg.num_params(),
            "loss": dataclasses.asdict(loss_cfg),
            "temperature": 1.0,
            "eos": None,
            "reps": reps,
            "load_avg_1min": [round(load[0], 2), round(load[1], 2)],
        },
        **sides,
        # > 1: ctxjax's step is faster. From the two medians above, nothing else.
        "ratio": round(medians["pytorch"]["step"] / medians["ctxjax"]["step"], 4),
        "peak_per_rep_flops_per_s": peaks,
        "unrolled_first": unrolled,
        "scanned": scanned,
        "flops": flops,
    }


def _ceilings(quick: bool) -> dict:
    """This machine's ceilings, measured now: XLA's fp32 matmul peak (`_peak_matmul`, with the
    fastest call as `best_flops_per_s`), torch's, the weight-streaming rate and the plain read
    rate from memory."""
    reps = 3 if quick else 10
    out = _peak_matmul(reps)
    out["torch_best_flops_per_s"] = _peak_matmul_torch(reps)["best_flops_per_s"]
    out["stream_bytes_per_s"] = weight_stream_rate(reps=10 if quick else 100)
    out["read_bytes_per_s"] = memory_read_rate(total_bytes=2**24 if quick else 2**30)
    return out


def _add_floors(
    name: str, c: dict, gemm_times: dict, decode_step: dict, machine_peak: float, stream: float
) -> None:
    """Adds to config `name`'s result `c` its roofline (`step_roofline`, with what its target
    needs) and its kernel floor (`kernels.kernel_floor` of its GEMMs' `gemm_times` and its
    `decode_step` times), with how far each side's step is from the floor of its own library's
    kernels and whether the target's step time is within the best kernels' floor and XLA's."""
    roof = step_roofline(STEP_CASES[name], c["flops"], machine_peak, stream)
    target = STEP_TARGETS.get(name)
    if target is not None:
        # The ctxjax step time the target needs, and whether the floor allows it.
        roof["target_ratio"] = target
        roof["target_step_s"] = c["pytorch"]["step"]["median_s"] / target
        roof["target_within_floor"] = roof["step_floor_s"] <= roof["target_step_s"]
    roof["ctxjax_over_floor"] = c["ctxjax"]["step"]["median_s"] / roof["step_floor_s"]
    c["roofline"] = roof
    c["kernel_floor"] = kernels.kernel_floor(
        STEP_CASES[name],
        gemm_times,
        decode_step,
        machine_peak,
        stream,
        roof["decode_memory_floor_s"],
    )
    floors = c["kernel_floor"]["floors"]
    for side, kernels_of in (("ctxjax", "xla"), ("pytorch", "torch")):
        over = c[side]["step"]["median_s"] / floors[kernels_of]["step_s"]
        c["kernel_floor"][f"{side}_over_own_floor"] = over
    if target is not None:
        c["kernel_floor"]["target_within_floor"] = floors["best"]["step_s"] <= roof["target_step_s"]
        # ctxjax can only run XLA's kernels: a target below their floor is out of its reach.
        within_xla = floors["xla"]["step_s"] <= roof["target_step_s"]
        c["kernel_floor"]["target_within_xla_floor"] = within_xla


def measure_step(
    *,
    configs: str = "a,b,c",
    reps: int = 5,
    quick: bool = False,
    seed: int = 0,
    torch_threads: int | None = None,
) -> dict:
    """The whole OPD + NCA step, ctxjax against the PyTorch way (`experiments.bench.torch_step`),
    for each of `configs` (comma-separated names of `STEP_CASES`) in one process.

    Both run the same weights (ctxjax's, exported with `ctxjax.hf.save_model`) on the same data
    batch (batch 8, context 32, prompt 16: left-padded, uneven lengths), sample at temperature 1
    with no EOS, and use full-vocabulary reverse KL + 0.5 * NCA and AdamW with global-norm clipping.
    Per config: the median of `reps` whole steps on each side (interleaved), their ratio (PyTorch
    way / ctxjax: > 1 means ctxjax is faster), the time of each part (sampling, teacher, student
    forward + backward, optimizer; ctxjax's parts are jitted alone, the PyTorch way's timed inside
    its step), the analytic matmul FLOPs and the FLOP rate as a fraction of this machine's measured
    single-matmul peak (`_peak_matmul`'s fastest call: a ceiling, which on a shared machine the
    median call underestimates).

    torch runs `torch_threads` threads (default: the cores this process may use, as XLA does).
    `quick`: the tiny config only, 2 reps, cheap compiles (a test, seconds).
    """
    import torch

    names = ["quick"] if quick else [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in STEP_CASES]
    if unknown or not names:
        raise ValueError(f"unknown configs {unknown or configs!r}; valid: {sorted(STEP_CASES)}")
    reps = 2 if quick else reps
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    copts = QUICK_COMPILER_OPTIONS if quick else None
    threads = torch_threads or usable_cores()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The ceilings and the kernel floor's GEMMs are timed before and after the configs, the
        # faster kept (see `_kept_ceilings`).
        before = _ceilings_and_kernels(names, quick)
        first_steps = 1 if quick else 3
        cases = {
            name: _compare_case(STEP_CASES[name], reps, seed, copts, first_steps) for name in names
        }
        after = _ceilings_and_kernels(names, quick)
    finally:
        torch.set_num_threads(default_threads)
    peak, stream, read = _kept_ceilings(before[0], after[0], cases)
    # The floors divide bytes by the faster rate: one no implementation can beat.
    floor_rate = max(stream, read)
    for c in cases.values():
        c["fraction_of_peak"] = {
            side: _peak_fractions(
                c["flops"],
                {part: row["median_s"] for part, row in c[side].items()},
                peak["best_flops_per_s"],
            )
            for side in ("ctxjax", "pytorch")
        }
    machine_peak = max(peak["best_flops_per_s"], peak["torch_best_flops_per_s"])
    for name, c in cases.items():
        gemm_times = kernels.fastest(before[1][name], after[1][name])
        decode_step = {
            lib: min(before[2][name][lib], after[2][name][lib]) for lib in ("xla_s", "torch_s")
        }
        _add_floors(name, c, gemm_times, decode_step, machine_peak, floor_rate)
    return {
        "benchmark": "step",
        "quick": quick,
        "environment": _step_environment(threads, copts),
        "peak_matmul": peak,
        "machine_peak_flops_per_s": machine_peak,
        "weight_stream_bytes_per_s": stream,
        "memory_read_bytes_per_s": read,
        "floor_bytes_per_s": floor_rate,
        "configs": cases,
    }


def _ceilings_and_kernels(names: list[str], quick: bool) -> tuple[dict, dict, dict]:
    """Measured now: (`_ceilings`, {config: its GEMMs' times}, {config: its decode step's
    times})."""
    gemm_reps = 2 if quick else 5
    ceilings = _ceilings(quick)
    gemms = {n: kernels.time_gemms(STEP_CASES[n], gemm_reps) for n in names}
    decode = {n: kernels.time_decode_step(STEP_CASES[n], gemm_reps) for n in names}
    return ceilings, gemms, decode


def _kept_ceilings(before: dict, after: dict, cases: dict) -> tuple[dict, float, float]:
    """(the matmul peaks kept, the weight-streaming rate, the plain read rate): each the faster of
    its measurements before and after the configs."""
    # A ceiling is the fastest this machine ran, so it is measured before and after the configs and
    # the better kept: load that slowed one measurement (a busy neighbour for a minute) cannot
    # deflate it and flatter every fraction of it.
    peak = dict(max(before, after, key=lambda c: c["best_flops_per_s"]))
    # The repetitions' probes count too: the peak is the fastest this machine ran the matmul at any
    # point of the run, so a slow spell over both the start and the end cannot lower it and
    # inflate every fraction of it.
    probes = [p for c in cases.values() for p in c["peak_per_rep_flops_per_s"]]
    peak["best_flops_per_s"] = max([peak["best_flops_per_s"], *probes])
    # The kept rates are the faster ones, `weight_stream_bytes_per_s` and `memory_read_bytes_per_s`.
    del peak["stream_bytes_per_s"], peak["read_bytes_per_s"]
    peak["torch_best_flops_per_s"] = max(c["torch_best_flops_per_s"] for c in (before, after))
    stream = max(c["stream_bytes_per_s"] for c in (before, after))
    read = max(c["read_bytes_per_s"] for c in (before, after))
    peak["measured"] = {"before": before, "after": after}
    return peak, stream, read


def _step_environment(threads: int, copts: dict | None) -> dict:
    """The machine, library versions and settings a `step` result was measured with."""
    import flax
    import jax
    import torch
    import transformers

    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cores": usable_cores(),
        "jax_backend": jax.default_backend(),
        "torch_threads": threads,
        "compiler_options": copts or {},
        # mimalloc where scripts/bench.py re-executed itself with it, for both sides
        "allocator": process_allocator(),
        "versions": {
            "jax": jax.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "load_avg_1min_end": round(os.getloadavg()[0], 2),
    }
