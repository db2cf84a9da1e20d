"""The step's kernel floor: its matrix products timed alone, at their own shapes, with the fastest
kernel this machine has for each (XLA's or torch's), summed.

`step_roofline` (measure.py) bounds the step by one 1024^3 matmul's peak: what the hardware can
do. This bounds it by what the kernels available to either implementation do on the step's actual
products: the dense layers' forward, input-gradient and weight-gradient GEMMs at the rows each view
has, the unembedding, the prefill and the decode's few-row products. Each product is timed in a
loop of its own (its operands stay in cache, no call overhead), everything that is not a matrix
product (norms, SwiGLU, RoPE, softmax, the losses, the draw) counts as free, and the attention's
small products are charged at the peak, so the floor is optimistic: a step time below it needs
faster matmul kernels than XLA's and torch's on this machine, not a better step around them.
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
    sample, the prefill of [B, P], then N - 1 decode steps of one row per sequence, and the
    next-token logits after each of the N; teacher, the forward on [c | x | y] and the unembedding
    of the N response positions; student, both views' forward and backward and their unembedding
    with its backward. Rows are every slot a view has, padding included (the model computes them
    all)."""
    layers, d, v = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    parts = {"sample": Counter(), "teacher": Counter(), "student": Counter()}
    student_rows = (batch * (prompt_len + new_tokens), batch * (ctx_prompt_len + new_tokens))
    for k, n in dense_shapes(cfg):
        parts["sample"][Gemm(batch * prompt_len, k, n, "fwd")] += layers
        parts["teacher"][Gemm(batch * (ctx_prompt_len + new_tokens), k, n, "fwd")] += layers
        for rows in student_rows:
            for kind in KINDS:
                parts["student"][Gemm(rows, k, n, kind)] += layers
    resp = batch * new_tokens
    # The decode: new_tokens - 1 steps of one row per sequence through every layer, then logits.
    for k, n in dense_shapes(cfg):
        parts["sample"][Gemm(batch, k, n, "fwd")] += layers * (new_tokens - 1)
    parts["sample"][Gemm(batch, d, v, "fwd")] += new_tokens
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


def _fastest_call(fn, reps: int) -> float:
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


def _operands(g: Gemm, out_major: bool) -> dict:
    """(lhs, rhs, dot_general dimension numbers) of `g` with the weight stored [K, N] or, when
    `out_major`, [N, K] (torch's `Linear` layout); the weight gradient comes out in the stored
    layout."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((g.m, g.k), np.float32), rng.standard_normal((g.m, g.n), np.float32)
    w = rng.standard_normal((g.n, g.k) if out_major else (g.k, g.n), np.float32)
    rows, cols = (((0,), (0,)), ((), ())), (((1,), (1,)), ((), ()))
    inner = (((1,), (0,)), ((), ()))
    return {
        "fwd": (x, w, cols if out_major else inner),
        "dx": (dy, w, inner if out_major else cols),
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
    return _fastest_call(lambda: jax.block_until_ready(products(lhs, rhs)), reps) / INNER_REPS


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
    return _fastest_call(_torch_product(g, out_major), reps)


def _best_gemm(g: Gemm, reps: int) -> dict:
    """Seconds of `g` per library, the faster of the two weight layouts."""
    return {
        "xla_s": min(_xla_gemm(g, major, reps) for major in (False, True)),
        "torch_s": min(_torch_gemm(g, major, reps) for major in (False, True)),
    }


def _case_gemms(case) -> dict:
    from ctxjax.model import ModelConfig

    b, p, n = case.batch, case.prompt_len, case.new_tokens
    return step_gemms(ModelConfig(**case.model), b, p, case.context_len + p, n)


def time_gemms(case, reps: int = 5) -> dict:
    """{`Gemm`: {"xla_s", "torch_s"}}: each distinct GEMM of the step of `case` (a
    `measure.StepCase`) timed with both libraries' kernels, the fastest of `reps` calls."""
    distinct = {g for counts in _case_gemms(case).values() for g in counts}
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
    peak_flops_per_s: float,
    stream_bytes_per_s: float,
    decode_memory_floor_s: float,
) -> dict:
    """The step of `case` (a `measure.StepCase`) at its kernel floor, per part, in seconds.

    Each part's GEMMs (`step_gemms`) at their `times` (`time_gemms`): with the faster library's
    kernel ("best"), with XLA's alone, with torch's alone; plus its attention products
    (`attention_flops`) at `peak_flops_per_s`; sampling at least its memory floor
    (`decode_memory_floor_s`: each decode step reads every weight, which products timed alone from
    cache do not); optimizer: AdamW reading parameters, gradients and both moments and writing
    three of them back, at `stream_bytes_per_s`. The timings are kept (`gemms`), with the parts
    that run each product, so the page can show whose kernels set the floor.
    """
    from ctxjax.model import ModelConfig

    cfg = ModelConfig(**case.model)
    b, p, n = case.batch, case.prompt_len, case.new_tokens
    parts = _case_gemms(case)
    attention = attention_flops(cfg, b, p, case.context_len + p, n)
    pick = {
        "best": lambda t: min(t["xla_s"], t["torch_s"]),
        "xla": lambda t: t["xla_s"],
        "torch": lambda t: t["torch_s"],
    }
    floors = {}
    for kernels, choose in pick.items():
        parts_s = {
            name: sum(choose(times[g]) * count for g, count in counts.items())
            + attention[name] / peak_flops_per_s
            for name, counts in parts.items()
        }
        parts_s["sample"] = max(parts_s["sample"], decode_memory_floor_s)
        parts_s["optimizer"] = 7 * 4 * cfg.num_params() / stream_bytes_per_s
        floors[kernels] = {"parts_s": parts_s, "step_s": sum(parts_s.values())}
    return {
        "floors": floors,
        "gemms": [
            {
                **dataclasses.asdict(g),
                "count": {name: c[g] for name, c in parts.items() if c[g]},
                **t,
            }
            for g, t in times.items()
        ],
    }
