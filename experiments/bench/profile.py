"""Where a compiled program's time goes: one call under `jax.profiler.trace`, its ops summed.

On an accelerator the trace holds the device's own kernel events (processes named "/device:...");
on a CPU, the host's XLA op events (those that name their `hlo_op`; loops and conditionals left
out, since their bodies' ops are events of their own). The events are summed by kernel
name on a device (XLA names a fusion's kernel after it) and by HLO instruction on a host, so a
fusion run 128 times in a decode loop is one row. Busy time can exceed the span on a CPU, where
XLA runs independent ops concurrently.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os

CONTAINERS = ("while", "conditional", "call")


# Kernel-name fragments by kind (first match wins; the rest is "other": XLA's fused elementwise
# and reduction kernels). cuBLAS's Hopper GEMMs are named nvjet_* / sm90_xmma_*, XLA's own Triton
# GEMMs gemm_fusion_*; jax.lax.top_k runs CUB's radix sort on a GPU.
CATEGORIES = (
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "dot")),
    ("sort", ("sort", "topk")),
    ("transpose", ("transpose",)),
    ("copy", ("memcpy", "memset", "copy")),
)


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((c for c, keys in CATEGORIES if any(k in name for k in keys)), "other")


def _events(trace_path: str) -> tuple[list[dict], dict]:
    with gzip.open(trace_path, "rt") as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return events, names


def op_times(trace_path: str, top: int = 20) -> dict:
    """The `top` ops by summed duration in a perfetto trace, their share of the busy time, and the
    span from the first op's start to the last op's end (the trace's microseconds, in seconds)."""
    events, process = _events(trace_path)
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if str(process.get(e["pid"], "")).startswith("/device:")]
    # A host trace nests a control-flow op's body inside its own event: count the body's ops only.
    ops = device or [
        e
        for e in spans
        if "hlo_op" in e.get("args", {}) and not e["args"]["hlo_op"].startswith(CONTAINERS)
    ]
    if not ops:
        raise ValueError(f"no device or XLA op events in {trace_path}")
    total = collections.Counter()
    count = collections.Counter()
    op = {}
    for e in ops:
        # A device kernel by its own name: XLA's GPU runtime launches most of them inside command
        # buffers (CUDA graphs), whose events all carry the buffer's `hlo_op`, not the fusion's.
        key = e["name"] if device else e["args"]["hlo_op"]
        total[key] += e["dur"]
        count[key] += 1
        op.setdefault(key, e.get("args", {}).get("hlo_op", key))
    busy = sum(total.values())
    by_category = collections.Counter()
    for key, t in total.items():
        by_category[category(key)] += t
    start = min(e["ts"] for e in ops)
    end = max(e["ts"] + e["dur"] for e in ops)
    return {
        "source": "device" if device else "host XLA ops",
        "events": len(ops),
        "busy_s": busy / 1e6,
        "span_s": (end - start) / 1e6,
        "categories": {c: round(t / busy, 4) for c, t in by_category.most_common()},
        "top": [
            {
                "kernel": key[:120],
                "op": op[key],
                "calls": count[key],
                "total_s": t / 1e6,
                "share": round(t / busy, 4),
            }
            for key, t in total.most_common(top)
        ],
    }


def profile_call(call, log_dir: str, top: int = 20) -> tuple[object, dict]:
    """Runs `call()` (compiled and warmed up by the caller) once under the profiler, writing the
    trace under `log_dir` (open `perfetto_trace.json.gz` in ui.perfetto.dev); returns its output and
    `op_times` of that trace, with the trace's path."""
    import jax

    os.makedirs(log_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")))
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        out = jax.block_until_ready(call())
    runs = set(glob.glob(os.path.join(log_dir, "plugins", "profile", "*"))) - before
    paths = [p for r in runs for p in glob.glob(os.path.join(r, "*perfetto_trace.json.gz"))]
    if len(paths) != 1:
        raise RuntimeError(f"expected one new perfetto trace under {log_dir}, found {paths}")
    return out, {"trace": paths[0], **op_times(paths[0], top)}
