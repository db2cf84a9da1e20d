"""The step's kernel floor: its matrix products timed alone, at their own shapes, with the fastest
kernel this machine has for each (XLA's or torch's), summed.

`step_roofline` (measure.py) bounds the step by one 1024^3 matmul's peak: what the hardware can
do. This bounds it by what the kernels available to either implementation do on the step's actual
products: the dense layers' forward, input-gradient and weight-gradient GEMMs at the rows each view
has, the unembedding, the prefill and the decode's few-row products. Each product is timed in a
loop of its own (its operands stay in cache, no call overhead), except the decode's: a decode step
reads every weight of the model in turn, so its products are timed that way, as one step's chain
over the model's own set of matrices (from memory, where the model outgrows the caches).
Everything that is not a matrix product (norms, SwiGLU, RoPE, softmax, the losses, the draw)
counts as free, and the attention's small products are charged at the peak, so the floor is
optimistic: a step time below it needs faster matmul kernels than XLA's and torch's on this
machine, not a better step around them.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np

# How each GEMM reads its operands, as the forward and backward of `y = x @ W` (x [M, K], W [K, N])
# compute them: the forward, the input gradient g @ W^T, the weight gradient x^T @ g.
KINDS = ("fwd", "dx", "dw")


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One product of a dense layer y[M, N] = x[M, K] @ W[K, N] of the given `kind`."""

    m: int
    k: int
    n: int
    kind: str

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def dense_shapes(cfg) -> list[tuple[int, int]]:
    """(K, N) of every dense layer of one block, q, k, v, o, gate, up, down."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    hq, hkv = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    return [(d, hq), (d, hkv), (d, hkv), (hq, d), (d, f), (d, f), (f, d)]


def step_gemms(cfg, batch: int, prompt_len: int, ctx_prompt_len: int, new_tokens: int) -> dict:
    """Per part of the OPD + NCA step, how many times it runs each GEMM (`Counter` of `Gemm`):
    sample, the prefill of [B, P] and the first token's logits; decode, the sampler's other N - 1
    steps, each one row per sequence through every layer and the unembedding (the products
    `time_decode_step` times as they run); teacher, the forward on [c | x | y] and the unembedding
    of the N response positions; student, both views' forward and backward and their unembedding
    with its backward. Rows are every slot a view has, padding included (the model computes them
    all)."""
    layers, d, v = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    parts = {"sample": Counter(), "decode": Counter(), "teacher": Counter(), "student": Counter()}
    student_rows = (batch * (prompt_len + new_tokens), batch * (ctx_prompt_len + new_tokens))
    for k, n in dense_shapes(cfg):
        parts["sample"][Gemm(batch * prompt_len, k, n, "fwd")] += layers
        parts["teacher"][Gemm(batch * (ctx_prompt_len + new_tokens), k, n, "fwd")] += layers
        for rows in student_rows:
            for kind in KINDS:
                parts["student"][Gemm(rows, k, n, kind)] += layers
    resp = batch * new_tokens
    parts["sample"][Gemm(batch, d, v, "fwd")] += 1  # the first token's logits, after the prefill
    # The decode: new_tokens - 1 steps of one row per sequence through every layer, then logits.
    for k, n in dense_shapes(cfg):
        parts["decode"][Gemm(batch, k, n, "fwd")] += layers * (new_tokens - 1)
    parts["decode"][Gemm(batch, d, v, "fwd")] += new_tokens - 1
    parts["teacher"][Gemm(resp, d, v, "fwd")] += 1
    for kind in KINDS:
        parts["student"][Gemm(resp, d, v, kind)] += len(student_rows)
    return parts


def attention_flops(cfg, batch: int, prompt_len: int, ctx_prompt_len: int, new_tokens: int) -> dict:
    """The attention's score and value products per part, every query x key slot as the model
    computes them (the sampler's queries over the whole cache of P + N slots; backward = 2x
    forward): the FLOPs `step_gemms` leaves out."""
    per_pair = 4 * cfg.num_heads * cfg.resolved_head_dim * cfg.num_layers  # QK^T and PV
    x, xc, cache = prompt_len + new_tokens, ctx_prompt_len + new_tokens, prompt_len + new_tokens
    return {
        "sample": batch * per_pair * (prompt_len + new_tokens - 1) * cache,
        "teacher": batch * per_pair * xc * xc,
        "student": 3 * batch * per_pair * (x * x + xc * xc),
    }


def fastest_call(fn, reps: int) -> float:
    """The fastest of `reps` timed calls after one warm-up: load can only slow a call, and a floor
    is the least the product takes."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# `_xla_gemm` runs its product this many times inside one jitted call: a call's dispatch (tens of
# microseconds) would otherwise count toward a small product's time, which inside the compiled step
# it never pays.
INNER_REPS = 8


def forward_dims(out_major: bool) -> tuple:
    """`dot_general` dimension numbers of a dense layer's forward, x [M, K] against its weight
    stored [K, N] or, when `out_major`, [N, K] (torch's `Linear` layout)."""
    return (((1,), (1,)), ((), ())) if out_major else (((1,), (0,)), ((), ()))


def _operands(g: Gemm, out_major: bool) -> dict:
    """(lhs, rhs, dot_general dimension numbers) of `g` with the weight stored [K, N] or, when
    `out_major`, [N, K] (torch's `Linear` layout); the weight gradient comes out in the stored
    layout."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((g.m, g.k), np.float32), rng.standard_normal((g.m, g.n), np.float32)
    w = rng.standard_normal((g.n, g.k) if out_major else (g.k, g.n), np.float32)
    rows = (((0,), (0,)), ((), ()))
    return {
        "fwd": (x, w, forward_dims(out_major)),
        # dy [M, N] against the same weight: the forward's contraction in the other layout.
        "dx": (dy, w, forward_dims(not out_major)),
        "dw": (dy, x, rows) if out_major else (x, dy, rows),
    }[g.kind]


def xla_product_s(lhs, rhs, dims, reps: int) -> float:
    """Seconds of one XLA `dot_general(lhs, rhs, dims)`: `INNER_REPS` dependent products in one
    program (so launches and the host's timer do not count), the fastest of `reps` calls."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def products(lhs, rhs):
        def body(_, out):
            # The next product reads the last one's output (one element, added to its input), so
            # the loop can neither hoist it nor run two at once.
            return jax.lax.dot_general(lhs + out[0, 0] * 1e-9, rhs, dims)

        out = jax.lax.dot_general(lhs, rhs, dims)
        return jax.lax.fori_loop(1, INNER_REPS, body, out)

    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    return fastest_call(lambda: jax.block_until_ready(products(lhs, rhs)), reps) / INNER_REPS


def _xla_gemm(g: Gemm, out_major: bool, reps: int) -> float:
    return xla_product_s(*_operands(g, out_major), reps)


def _torch_product(g: Gemm, out_major: bool):
    """A call computing `g` in torch on the operands `_operands` gives: lhs's contracted axis last,
    rhs's first, through transposed views as the backward pass takes them."""
    import torch

    lhs, rhs, ((lc, rc), _) = _operands(g, out_major)
    a, b = torch.from_numpy(lhs), torch.from_numpy(rhs)
    a, b = (a.T if lc == (0,) else a), (b.T if rc == (1,) else b)
    return lambda: a @ b


def _torch_gemm(g: Gemm, out_major: bool, reps: int) -> float:
    return fastest_call(_torch_product(g, out_major), reps)


def _best_gemm(g: Gemm, reps: int) -> dict:
    """Seconds of `g` per library, the faster of the two weight layouts."""
    return {
        "xla_s": min(_xla_gemm(g, major, reps) for major in (False, True)),
        "torch_s": min(_torch_gemm(g, major, reps) for major in (False, True)),
    }


def _decode_weights(cfg, out_major: bool) -> list[np.ndarray]:
    """Every matrix one decode step reads, in the order it reads them (each layer's q, k, v, o,
    gate, up, down, then the unembedding), each its own array as the model's are, stored [K, N] or,
    when `out_major`, [N, K]."""
    rng = np.random.default_rng(0)
    shapes = [*dense_shapes(cfg) * cfg.num_layers, (cfg.hidden_size, cfg.vocab_size)]
    return [
        rng.standard_normal((n, k) if out_major else (k, n), np.float32) * np.float32(0.02)
        for k, n in shapes
    ]


def _decode_chain(x_BxD, weights: list, matmul, num_layers: int):
    """One decode step's products on rows `x_BxD`, in the sampler's order: per layer q, k, v of x,
    o of q, gate and up of the residual, down of their product; then the logits. The few
    elementwise ops between them (on [B, .] rows: what the attention, norms and SwiGLU would cost
    is counted free) only make each product read the last one's output, so the layers run in
    order as a decode step's do. Array-library agnostic: jax or torch arrays and `matmul`."""
    it = iter(weights)
    for _ in range(num_layers):
        wq, wk, wv, wo, wg, wu, wd = (next(it) for _ in range(7))
        q, k, v = matmul(x_BxD, wq), matmul(x_BxD, wk), matmul(x_BxD, wv)
        h = x_BxD + 1e-3 * matmul(q * (1 + 1e-9 * (k.sum() + v.sum())), wo)
        x_BxD = h + 1e-3 * matmul(matmul(h, wg) * matmul(h, wu), wd)
    return x_BxD + 1e-9 * matmul(x_BxD, next(it))[:, :1]


def _xla_decode_step(cfg, batch: int, out_major: bool, reps: int) -> float:
    """Seconds of one decode step's products (`_decode_chain`) with XLA's kernels: `INNER_REPS`
    steps in one program, the fastest of `reps` calls."""
    import jax
    import jax.numpy as jnp

    weights = [jnp.asarray(w) for w in _decode_weights(cfg, out_major)]
    dims = forward_dims(out_major)

    def matmul(x, w):
        return jax.lax.dot_general(x, w, dims)

    @jax.jit
    def steps(x, weights):
        body = lambda _, x: _decode_chain(x, weights, matmul, cfg.num_layers)  # noqa: E731
        return jax.lax.fori_loop(0, INNER_REPS, body, x)

    x = jnp.ones((batch, cfg.hidden_size), jnp.float32)
    return fastest_call(lambda: jax.block_until_ready(steps(x, weights)), reps) / INNER_REPS


def _torch_decode_step(cfg, batch: int, out_major: bool, reps: int) -> float:
    """Seconds of one decode step's products (`_decode_chain`) with torch's kernels (eager, as
    transformers runs them: each op's dispatch, a few microseconds, counts), the fastest of `reps`
    calls of `INNER_REPS` steps."""
    import torch

    weights = [torch.from_numpy(w) for w in _decode_weights(cfg, out_major)]
    matmul = torch.nn.functional.linear if out_major else torch.matmul
    x = torch.ones((batch, cfg.hidden_size), dtype=torch.float32)

    def steps():
        y = x
        with torch.no_grad():
            for _ in range(INNER_REPS):
                y = _decode_chain(y, weights, matmul, cfg.num_layers)
        return y

    return fastest_call(steps, reps) / INNER_REPS


def time_decode_step(case, reps: int = 3) -> dict:
    """{"xla_s", "torch_s"}: one decode step of `case` (a `measure.StepCase`) with each library's
    kernels, the faster of the two weight layouts. Unlike `time_gemms`, whose products are each
    timed alone with their operands in cache, every matrix is read in turn as in the sampler, so a
    model larger than the caches streams its weights from memory at the rate these few-row
    products reach, well below a plain read's rate (docs/notes.md)."""
    from ctxjax.model import ModelConfig

    cfg = ModelConfig(**case.model)
    return {
        "xla_s": min(_xla_decode_step(cfg, case.batch, m, reps) for m in (False, True)),
        "torch_s": min(_torch_decode_step(cfg, case.batch, m, reps) for m in (False, True)),
    }


def _case_gemms(case) -> dict:
    from ctxjax.model import ModelConfig

    b, p, n = case.batch, case.prompt_len, case.new_tokens
    return step_gemms(ModelConfig(**case.model), b, p, case.context_len + p, n)


def time_gemms(case, reps: int = 5) -> dict:
    """{`Gemm`: {"xla_s", "torch_s"}}: each distinct GEMM of the step of `case` (a
    `measure.StepCase`) but the decode's (`time_decode_step` times those as they run) timed with
    both libraries' kernels, the fastest of `reps` calls."""
    parts = _case_gemms(case)
    distinct = {g for name, counts in parts.items() if name != "decode" for g in counts}
    return {g: _best_gemm(g, reps) for g in sorted(distinct, key=dataclasses.astuple)}


def fastest(*timings: dict) -> dict:
    """Per GEMM and library, the fastest of several `time_gemms` results of one case."""
    return {
        g: {lib: min(t[g][lib] for t in timings) for lib in ("xla_s", "torch_s")}
        for g in timings[0]
    }


def kernel_floor(
    case,
    times: dict,
    decode_step: dict,
    peak_flops_per_s: float,
    stream_bytes_per_s: float,
    decode_memory_floor_s: float,
) -> dict:
    """The step of `case` (a `measure.StepCase`) at its kernel floor, per part, in seconds.

    Each part's GEMMs (`step_gemms`) at their `times` (`time_gemms`): with the faster library's
    kernel ("best"), with XLA's alone, with torch's alone; plus its attention products
    (`attention_flops`) at `peak_flops_per_s`. Sampling: the prefill's GEMMs so, then N - 1 decode
    steps at `decode_step`'s time for the library (`time_decode_step`: the products reading every
    weight in turn, as the sampler does, not from cache), and at least its memory floor
    (`decode_memory_floor_s`); optimizer: AdamW reading parameters, gradients and both moments and
    writing three of them back, at `stream_bytes_per_s`. The timings are kept (`gemms`, with the
    parts that run each product, and `decode_step`), so the page can show whose kernels set the
    floor.
    """
    from ctxjax.model import ModelConfig

    cfg = ModelConfig(**case.model)
    b, p, n = case.batch, case.prompt_len, case.new_tokens
    parts = _case_gemms(case)
    decode_steps = n - 1
    attention = attention_flops(cfg, b, p, case.context_len + p, n)
    pick = {
        "best": lambda t: min(t["xla_s"], t["torch_s"]),
        "xla": lambda t: t["xla_s"],
        "torch": lambda t: t["torch_s"],
    }
    floors = {}
    for kernels, choose in pick.items():
        parts_s = {
            name: sum(choose(times[g]) * count for g, count in parts[name].items())
            + attention[name] / peak_flops_per_s
            for name in ("sample", "teacher", "student")
        }
        parts_s["sample"] += decode_steps * choose(decode_step)
        parts_s["sample"] = max(parts_s["sample"], decode_memory_floor_s)
        parts_s["optimizer"] = 7 * 4 * cfg.num_params() / stream_bytes_per_s
        floors[kernels] = {"parts_s": parts_s, "step_s": sum(parts_s.values())}
    return {
        "floors": floors,
        "decode_step": dict(decode_step),
        "gemms": [
            {
                **dataclasses.asdict(g),
                "count": {name: c[g] for name, c in parts.items() if c[g]},
                **t,
            }
            for g, t in times.items()
        ],
    }
