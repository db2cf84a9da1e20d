"""Side-by-side A/B timings on one accelerator, for the choices `scripts/bench.py gpu` cannot show
on its own (each pair interleaved in one process, medians of `reps` calls):

1. the sampler with the weights cast to the compute dtype once per rollout
   (`model.cast_for_compute`, the library's behaviour) against the layers casting the stored
   float32 weights on every decode step (the cast replaced by the identity): same tokens asserted;
2. the student's attention forward + backward: `model._attend` against
   `jax.nn.dot_product_attention` (cuDNN's and XLA's);
3. `jax.lax.top_k(x, 256)` over the student's [B*N, V] logits (what `losses.reverse_kl_topk` runs)
   against a two-stage exact top-k (top-k of each of `chunks` vocabulary slices, then of the
   candidates): same values asserted.

    python -m experiments.gpu_ab [--tiny] [--reps 5] [--out ab.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics


def _interleaved(fns: dict, reps: int) -> dict:
    from experiments.bench.measure import _time_call

    for fn in fns.values():
        _time_call(fn)  # compile + warm-up
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_time_call(fn)[1])
    return {k: {"times_s": ts, "median_s": statistics.median(ts)} for k, ts in times.items()}


def sampler_cast(tiny: bool, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ctxjax import sampling
    from ctxjax.model import ModelConfig, Numerics, create_model
    from experiments.bench import gpu, measure

    setup = gpu.TINY_SETUP if tiny else gpu.GPU_SETUP
    cfg = ModelConfig(**(gpu.TINY_MODEL if tiny else gpu.GPU_MODEL))
    num = Numerics(param_dtype="float32", compute_dtype="bfloat16")
    graphdef, params = nnx.split(create_model(cfg, 0, num))
    b, p, n = setup["batch"], setup["prompt_len"], setup["new_tokens"]
    c = setup["context_len"]
    batch = measure._train_batch(np.random.default_rng(0), cfg.vocab_size, b, p, c + p)
    ids, mask = jnp.asarray(batch["prompt_ids"]), jnp.asarray(batch["prompt_mask"])
    method = sampling.SamplingMethod(temperature=1.0)

    def build(cast):
        def run(params, ids, mask, rng):
            sampling_cast = sampling.cast_for_compute
            sampling.cast_for_compute = cast  # read at trace time only
            try:
                return sampling.sample(
                    nnx.merge(graphdef, params), ids, mask, rng,
                    max_new_tokens=n, method=method, eos_ids=(), pad_id=0,
                )  # fmt: skip
            finally:
                sampling.cast_for_compute = sampling_cast

        return functools.partial(jax.jit(run), params, ids, mask, jax.random.key(0))

    fns = {"cast_once": build(sampling.cast_for_compute), "cast_each_step": build(lambda s, n: s)}
    a, b_ = fns["cast_once"](), fns["cast_each_step"]()
    np.testing.assert_array_equal(a.tokens_BxN, b_.tokens_BxN)
    res = _interleaved(fns, reps)
    res["each_step_over_once"] = res["cast_each_step"]["median_s"] / res["cast_once"]["median_s"]
    res["tokens_equal"] = True
    return res


def topk(tiny: bool, reps: int, k: int = 256, chunks: int = 64) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench import gpu

    setup = gpu.TINY_SETUP if tiny else gpu.GPU_SETUP
    vocab = (gpu.TINY_MODEL if tiny else gpu.GPU_MODEL)["vocab_size"]
    rows = setup["batch"] * setup["new_tokens"]
    k = min(k, vocab // chunks) if tiny else k
    x = jax.random.normal(jax.random.key(0), (rows, vocab), jnp.float32)

    def two_stage(x):
        pad = (-vocab) % chunks
        xp = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        v, i = jax.lax.top_k(xp.reshape(rows, chunks, -1), k)
        i = i + (jnp.arange(chunks) * xp.shape[1] // chunks)[None, :, None]
        v2, j = jax.lax.top_k(v.reshape(rows, -1), k)
        return v2, jnp.take_along_axis(i.reshape(rows, -1), j, axis=-1)

    one = jax.jit(lambda x: jax.lax.top_k(x, k))
    two = jax.jit(two_stage)
    np.testing.assert_array_equal(one(x)[0], two(x)[0])
    res = _interleaved({"lax_top_k": lambda: one(x), "two_stage": lambda: two(x)}, reps)
    res["shape"], res["k"], res["chunks"] = [rows, vocab], k, chunks
    return res


def attention(tiny: bool, reps: int) -> dict:
    """The student's [c | x | y] attention, forward + backward (the gradient of a random projection
    of the output with respect to q, k and v), as `model._attend` writes it against
    `jax.nn.dot_product_attention` (cuDNN's fused kernel where it accepts the call, and XLA's),
    left-padded and causal, bf16 inputs. Each variant's largest difference from `_attend` is kept;
    a variant that refuses the call has its error kept instead."""
    import jax
    import jax.numpy as jnp

    from ctxjax.model import _attend
    from experiments.bench import gpu

    setup = gpu.TINY_SETUP if tiny else gpu.GPU_SETUP
    m = gpu.TINY_MODEL if tiny else gpu.GPU_MODEL
    b = setup["batch"]
    n_len = setup["context_len"] + setup["prompt_len"] + setup["new_tokens"]
    h, kv, dh = m["num_heads"], m["num_kv_heads"], m["head_dim"]
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, n_len, h, dh), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, n_len, kv, dh), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, n_len, kv, dh), jnp.bfloat16)
    cot = jax.random.normal(keys[3], (b, n_len, h, dh), jnp.float32)
    pad = jnp.arange(b) * (n_len // (2 * b))  # row i starts after i * L / 2B padding slots
    valid_BxS = jnp.arange(n_len)[None, :] >= pad[:, None]
    causal = jnp.tril(jnp.ones((n_len, n_len), bool))
    allowed_BxLxS = causal[None] & valid_BxS[:, None, :]

    def ours(q, k, v):
        return _attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed_BxLxS)

    def small_transposes(q, k, v):
        # `_attend` with the query and the output transposed (small: [B, L, H, Dh]) so that both
        # einsums keep (g, l) in the order of the [B, K, G, L, S] scores: on the H200 the rest's
        # costliest kernel (9.6%) transposed the bf16 probabilities to [B, K, L, G, S] for the
        # output einsum. A candidate to measure on a device, not yet the library's formulation.
        b_, n_, h_, d_ = q.shape
        kv_ = k.shape[2]
        q_ = q.reshape(b_, n_, kv_, h_ // kv_, d_).transpose(0, 2, 3, 1, 4)
        scores = jnp.einsum(
            "bkgld,bskd->bkgls", q_, k, preferred_element_type=jnp.float32
        ) / math.sqrt(d_)
        scores = jnp.where(allowed_BxLxS[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bkgls,bskd->bkgld", probs.astype(v.dtype), v)
        return out.transpose(0, 3, 1, 2, 4).reshape(b_, n_, h_, d_)

    def library(impl):
        def run(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, mask=allowed_BxLxS[:, None], implementation=impl
            )

        return run

    def fwd_bwd(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    variants = {"ours": fwd_bwd(ours), "small_transposes": fwd_bwd(small_transposes)}
    variants["xla"] = fwd_bwd(library("xla"))
    variants["cudnn"] = fwd_bwd(library("cudnn"))
    ref = variants["ours"](q, k, v)
    res, fns = {"shape_BxLxHxKxDh": [b, n_len, h, kv, dh]}, {}
    for name, fn in variants.items():
        try:
            out = fn(q, k, v)
        except Exception as err:  # a refused variant is a result to keep
            res[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        diff = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32))))
            for a, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
        )
        res[name] = {"max_abs_diff_vs_ours": diff}
        fns[name] = functools.partial(fn, q, k, v)
    for name, row in _interleaved(fns, reps).items():
        res[name].update(row)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax

    out = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
    out["topk"] = topk(args.tiny, args.reps)
    print(json.dumps(out["topk"], indent=1), flush=True)
    out["attention"] = attention(args.tiny, args.reps)
    print(json.dumps(out["attention"], indent=1), flush=True)
    out["sampler_cast"] = sampler_cast(args.tiny, args.reps)
    print(json.dumps(out["sampler_cast"], indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
