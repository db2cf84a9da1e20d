"""`scripts/bench.py gpu`: the OPD + NCA train step on one accelerator, against the chip's limits.

For a random Qwen2.5-0.5B-shaped model (bf16 compute; float32 parameters by default, the
`configs/hf_gpu.yaml` setting) it reports, in one run of a few minutes on one GPU:

1. MFU: the sampling part (`sampling.sample`) and the rest of the step (teacher pass, the two
   student passes, loss, AdamW update: `step.make_update_step`, the step after its rollout) timed
   apart, each jitted on its own, and the whole `step.make_train_step` step; model FLOPs counted
   analytically (matmuls; the remat recomputation not counted, as MFU defines it) and, for the
   rest, by XLA's cost analysis; divided by the median time and the device's peak bf16 FLOP/s
   (`DEVICE_SPECS`, or `--peak-flops`; "unknown" otherwise, e.g. on a CPU, and then no MFU);
2. decode tokens/s against the HBM-bandwidth bound: the time of one decode step is
   `(t(sample N tokens) - t(sample 1 token)) / (N - 1)`, the bound is the bytes a decode step must
   read (`measure.decode_bytes`) over the device's HBM bandwidth;
3. peak device memory with and without `numerics.remat` and `loss.chunk_size`, of the rest of the
   step (where they act: sampling's memory is the KV cache) in its four variants and of the whole
   step: `memory_stats()["peak_bytes_in_use"]` where the device has it (GPU, TPU), next to XLA's
   compiled-memory estimate (the only figure on a CPU).

The train state is donated by every program, as `step.jit_train_step` does, so only one copy of
it is alive. The programs are lowered first and compiled together in threads: the compiles of the
24-layer programs are most of the few minutes a run takes on a GPU.

Everything runs the library's own functions (`model.create_model` with `model.Numerics`,
`sampling.sample`, `step.make_train_step`, `step.make_update_step`): nothing special-cased.
`tiny=True` (`--tiny`) is the same pipeline on a 2-layer model, for the CPU test suite.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import re
import time

import numpy as np

from experiments import environment
from experiments.bench import measure, profile

# Qwen2.5-0.5B's architecture (its config.json), random weights.
GPU_MODEL = dict(
    family="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_embeddings=True,
    qkv_bias=True,
    max_position_embeddings=32768,
)
TINY_MODEL = dict(
    GPU_MODEL,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
# Batch and lengths. `context_len + prompt_len` is the `[c | x]` width. `chunk` is the chunked
# variant's `loss.chunk_size` (configs/hf_gpu.yaml's 32).
GPU_SETUP = dict(batch=16, context_len=256, prompt_len=128, new_tokens=128, chunk=32)
TINY_SETUP = dict(batch=2, context_len=8, prompt_len=8, new_tokens=8, chunk=4)

# The project's targets for the step on an accelerator.
REST_MFU_TARGET = 0.40  # the non-sampling part, on an H100/H200-class GPU
DECODE_BOUND_FACTOR = 2.0  # decode within this factor of the HBM-bandwidth bound
MFU_TARGET_DEVICES = ("H100 SXM", "H200")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of one accelerator: dense bf16 FLOP/s and HBM bytes/s (None: unknown)."""

    name: str
    pattern: str  # regular expression searched (case-insensitive) in jax's `device_kind`
    peak_flops: float | None
    hbm_bytes_per_s: float | None


# First match wins. jax's device_kind strings: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "TPU v4", "TPU v5 lite" (v5e),
# "TPU v5" / "TPU v5p", "TPU v6 lite" (v6e). A kind not listed (H100 PCIe/NVL, GH200, ...) is
# unknown rather than guessed from a sibling with other clocks or memory; `\b` keeps "GH200" from
# matching "H200".
DEVICE_SPECS = (
    DeviceSpec("H100 SXM", r"\bh100\b.*(hbm3|sxm)", 989e12, 3.35e12),
    DeviceSpec("H200", r"\bh200\b", 989e12, 4.8e12),
    DeviceSpec("A100 80GB", r"\ba100\b.*80\s*gb", 312e12, 2.0e12),
    DeviceSpec("A100 40GB", r"\ba100\b.*40\s*gb", 312e12, 1.555e12),
    DeviceSpec("A100", r"\ba100\b", 312e12, None),
    DeviceSpec("TPU v4", r"^tpu v4$", 275e12, 1.2e12),
    DeviceSpec("TPU v5e", r"^tpu v5(e| lite)$", 197e12, 0.82e12),
    DeviceSpec("TPU v5p", r"^tpu v5p?$", 459e12, 2.765e12),
    DeviceSpec("TPU v6e", r"^tpu v6(e| lite)$", 918e12, 1.64e12),
)


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The `DEVICE_SPECS` entry whose pattern matches `device_kind`, or None."""
    kind = device_kind.strip()
    return next((s for s in DEVICE_SPECS if re.search(s.pattern, kind, re.IGNORECASE)), None)


def _limit(override: float | None, table: float | None, spec: DeviceSpec | None, flag: str):
    """(value, source) of a device limit: the command-line override, else the table, or unknown."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"{flag} must be > 0, got {override}")
        return float(override), flag
    if table is not None:
        return table, f"table: {spec.name}"
    return None, "unknown"


def _rest_fn(graphdef, teacher_graphdef, tx, step_cfg):
    """The train step after its rollout, on given response tokens: `step.make_update_step`, the
    same function the step runs after sampling (teacher pass, the two student passes and the loss,
    the optax update, the step's metrics); returns the next `TrainState` and the metrics, like the
    step (jitted with the state donated)."""
    import jax
    import jax.numpy as jnp

    from ctxjax.sampling import SampleOutput
    from ctxjax.step import make_update_step

    update = make_update_step(graphdef, teacher_graphdef, tx, step_cfg)

    def rest(state, teacher_params, batch, tokens_BxN, mask_BxN):
        rollout = SampleOutput(
            tokens_BxN=tokens_BxN,
            logprobs_BxN=jnp.zeros(tokens_BxN.shape, jnp.float32),  # the update does not read them
            mask_BxN=mask_BxN,
            lengths_B=mask_BxN.sum(axis=-1).astype(jnp.int32),
        )
        # No retention anchor here (it would sample): the key is not read.
        return update(state, teacher_params, batch, rollout, jax.random.key(0))

    return rest


def _sample_fn(graphdef, new_tokens: int, method):
    """`sampling.sample` over the student's params, the full budget (no EOS)."""
    from flax import nnx

    from ctxjax.sampling import sample

    def sample_part(params, ids_BxP, mask_BxP, rng):
        model = nnx.merge(graphdef, params)
        return sample(
            model,
            ids_BxP,
            mask_BxP,
            rng,
            max_new_tokens=new_tokens,
            method=method,
            eos_ids=(),
            pad_id=0,
        )

    return sample_part


def _compile_all(lowered: dict, copts: dict | None) -> tuple[dict, float]:
    """Compiles every lowered program, in threads (XLA compiles outside the GIL, and the 24-layer
    programs' compiles are most of the benchmark's wall time); returns them and the wall seconds."""
    t0 = time.perf_counter()
    workers = max(1, min(len(lowered), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {k: pool.submit(lo.compile, compiler_options=copts) for k, lo in lowered.items()}
        compiled = {k: f.result() for k, f in futures.items()}
    return compiled, time.perf_counter() - t0


def _xla_memory(compiled) -> dict:
    """XLA's plan for one program: arguments + outputs + temporaries - donated (aliased) bytes."""
    m = compiled.memory_analysis()
    row = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
    }
    row["estimate_bytes"] = (
        row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
    )
    return row


def _device_peak(device) -> int | None:
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _variant(remat: bool, chunk: int) -> str:
    return f"remat={int(remat)},chunk={chunk}"


@dataclasses.dataclass(frozen=True)
class _Models:
    """The student (train state; graphdef by remat setting), the teacher and the optimizer."""

    cfg: object  # ctxjax.model.ModelConfig
    tx: object  # optax.GradientTransformation
    graphdefs: dict  # remat (bool) -> the student's graphdef
    state: object  # ctxjax.step.TrainState
    teacher_graphdef: object
    teacher_params: object


def _build(model: dict, numerics, seed: int) -> _Models:
    """The student's train state and graphdefs with and without remat, the teacher's params."""
    from flax import nnx

    from ctxjax.config import OptimConfig
    from ctxjax.model import ModelConfig, create_model
    from ctxjax.step import init_state, make_optimizer

    cfg = ModelConfig(**model)
    tx = make_optimizer(OptimConfig(), 1000)
    graphdef, state = init_state(create_model(cfg, seed, numerics), tx)
    teacher_graphdef, teacher_params = nnx.split(create_model(cfg, seed + 1, numerics), nnx.Param)
    remat_num = dataclasses.replace(numerics, remat=not numerics.remat)
    # The other remat setting's graphdef, from an abstract model (no second set of weights).
    other = nnx.split(nnx.eval_shape(lambda: create_model(cfg, seed, remat_num)), nnx.Param)[0]
    graphdefs = {numerics.remat: graphdef, remat_num.remat: other}
    return _Models(cfg, tx, graphdefs, state, teacher_graphdef, teacher_params)


def _lower_programs(built: _Models, setup: dict, batch: dict, rng, sample_params) -> dict:
    """Lowers the programs: the rest of the step in four variants (remat x chunked loss) as
    `rest:<variant>`, the whole step (no remat, unchunked) as `step`, the sampler with the full
    budget (`sample`) and with one token (`sample_1`, the prefill)."""
    import jax

    from ctxjax.config import LossConfig, OptimConfig, RolloutConfig
    from ctxjax.sampling import SamplingMethod
    from ctxjax.step import StepConfig, jit_train_step, make_train_step

    tx, state, teacher_params = built.tx, built.state, built.teacher_params
    b, n = setup["batch"], setup["new_tokens"]
    rollout = RolloutConfig(max_new_tokens=n, temperature=1.0)
    method = SamplingMethod(temperature=rollout.temperature)
    resp = jax.ShapeDtypeStruct((b, n), np.int32)
    resp_mask = jax.ShapeDtypeStruct((b, n), bool)
    step_cfg = StepConfig(
        loss=LossConfig(),
        optim=OptimConfig(),
        rollout=rollout,
        total_steps=1000,
        micro_batches=1,
        eos_ids=(),
        pad_id=0,
    )
    lowered = {}
    for remat in (False, True):
        for chunk in (0, setup["chunk"]):
            chunked = dataclasses.replace(step_cfg, loss=LossConfig(chunk_size=chunk))
            rest = _rest_fn(built.graphdefs[remat], built.teacher_graphdef, tx, chunked)
            lowered[f"rest:{_variant(remat, chunk)}"] = jax.jit(rest, donate_argnums=(0,)).lower(
                state, teacher_params, batch, resp, resp_mask
            )
    main = built.graphdefs[False]
    step = jit_train_step(make_train_step(main, built.teacher_graphdef, tx, step_cfg))
    lowered["step"] = step.lower(state, teacher_params, batch, rng)
    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    for key, budget in (("sample", n), ("sample_1", 1)):
        fn = jax.jit(_sample_fn(main, budget, method))
        lowered[key] = fn.lower(sample_params, ids, mask, rng)
    return lowered


def _time_chained(fn, state, args: tuple, reps: int) -> tuple[list[float], object]:
    """`reps` timed calls of a program that donates its state (the first, untimed, a warm-up);
    each call gets the state the previous one returned. Returns the times and the last state."""
    times = []
    for _ in range(reps + 1):
        (state, _), dt = measure._time_call(fn, state, *args)
        times.append(dt)
    return times[1:], state


def _times(fn, args: tuple, reps: int) -> list[float]:
    measure._time_call(fn, *args)  # warm-up (caches, autotuned kernels' first launch)
    return [measure._time_call(fn, *args)[1] for _ in range(reps)]


def _memory(compiled: dict, state, args: dict, device) -> tuple[dict, object]:
    """Peak memory of the rest variants and the whole step: XLA's estimate, and the device's peak
    after one call of each, in increasing order of the estimate. The device peak only grows (it
    cannot be reset), so a program that does not raise it gets the running peak as an upper bound
    (`peak_is_upper_bound`). Returns the rows and the last state (every program donates it)."""
    names = [k for k in compiled if k.startswith("rest:")] + ["step"]
    rows = {k: _xla_memory(compiled[k]) for k in names}
    for name in sorted(names, key=lambda k: rows[k]["estimate_bytes"]):
        before = _device_peak(device)
        (state, _), dt = measure._time_call(compiled[name], state, *args[name])
        after = _device_peak(device)
        rows[name]["first_call_s"] = round(dt, 5)
        rows[name]["device_peak_bytes"] = after
        rows[name]["peak_is_upper_bound"] = None if after is None else bool(after <= before)
    return rows, state


# The measured ceilings: a square bf16 matmul of this side (tiny: a CPU-sized one) and a float32
# array of this many bytes streamed once (read + write), beside the datasheet's figures.
CEILING_MATMUL_N = {False: 8192, True: 128}
CEILING_STREAM_BYTES = {False: 2 * 2**30, True: 4 * 2**20}


def measured_ceilings(tiny: bool, reps: int) -> dict:
    """What this device reaches with XLA's own kernels, measured in this run: the bf16 matmul rate
    (`kernels.xla_product_s`: dependent products in one program, so launches and the host's timer
    do not count) and the streaming rate of `x + 1` over a float32 array (bytes read + written).
    The fastest of `reps` calls after a warm-up: nothing makes a kernel faster than it can run."""
    import jax
    import jax.numpy as jnp

    from experiments.bench import kernels

    n = CEILING_MATMUL_N[tiny]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul_s = kernels.xla_product_s(a, b, (((1,), (0,)), ((), ())), reps)
    x = jnp.zeros(CEILING_STREAM_BYTES[tiny] // 4, jnp.float32)
    add_one = jax.jit(lambda x: x + 1)
    stream_s = kernels.fastest_call(lambda: jax.block_until_ready(add_one(x)), reps)
    return {
        "matmul_n": n,
        "matmul_flops_per_s": 2 * n**3 / matmul_s,
        "stream_bytes": 2 * x.nbytes,
        "stream_bytes_per_s": 2 * x.nbytes / stream_s,
    }


def _rate(flops: float, seconds: float, peak: float | None, measured_peak: float) -> dict:
    per_s = flops / seconds
    return {
        "flops": flops,
        "flops_per_s": per_s,
        "mfu": None if peak is None else round(per_s / peak, 5),
        # The fraction of the matmul rate this device reached in this run (`measured_ceilings`).
        "of_measured_peak": round(per_s / measured_peak, 5),
    }


def _train_figures(
    cfg, setup: dict, timing: dict, xla_rest: float, peak, spec, measured: dict
) -> dict:
    """MFU of the sampling part, the rest and the whole step, against the target."""
    from ctxjax.config import LossConfig

    b, c, p, n = (setup[k] for k in ("batch", "context_len", "prompt_len", "new_tokens"))
    # Model FLOPs: the unchunked loss's count (the chunked loss's recompute, like remat's, is not
    # model work).
    analytic = measure._step_flops_analytic(cfg, b, p, c + p, n, LossConfig(chunk_size=0))
    med = {k: row["median_s"] for k, row in timing.items()}
    top = measured["matmul_flops_per_s"]
    rates = {
        "sample": _rate(analytic["sample"], med["sample"], peak, top),
        "rest": _rate(analytic["teacher"] + analytic["student"], med["rest"], peak, top),
        "step": _rate(analytic["total"], med["step"], peak, top),
    }
    rest_mfu = rates["rest"]["mfu"]
    applies = spec is not None and spec.name in MFU_TARGET_DEVICES
    return {
        "timing": timing,
        "sum_of_parts_s": round(med["sample"] + med["rest"], 5),
        "flops_analytic": analytic,
        # The unchunked rest has no loop, so XLA counts every FLOP it runs (a cross-check).
        "flops_xla_rest": xla_rest,
        "rates": rates,
        "target": {
            "rest_mfu_min": REST_MFU_TARGET,
            "applies_to": list(MFU_TARGET_DEVICES),
            "applies": applies,
            "met": bool(rest_mfu >= REST_MFU_TARGET) if applies and rest_mfu is not None else None,
        },
    }


def _decode_figures(cfg, numerics, setup: dict, timing: dict, hbm, measured: dict) -> dict:
    """One decode step's time, `(t(sample N) - t(sample 1)) / (N - 1)`, against the HBM bound."""
    b, p, n = setup["batch"], setup["prompt_len"], setup["new_tokens"]
    step_s = (timing["sample"]["median_s"] - timing["sample_1"]["median_s"]) / (n - 1)
    read = measure.decode_bytes(cfg, numerics, b, p + n)
    bound_s = None if hbm is None else read["total"] / hbm
    ratio = None if bound_s is None or step_s <= 0 else step_s / bound_s
    return {
        "batch": b,
        "cache_slots": p + n,
        "bytes_per_step": read,
        "step_s": round(step_s, 7),
        "tokens_per_s": round(b / step_s, 1) if step_s > 0 else None,
        "bound_step_s": None if bound_s is None else round(bound_s, 7),
        "bound_tokens_per_s": None if bound_s is None else round(b / bound_s, 1),
        "over_bound": None if ratio is None else round(ratio, 3),
        # The same bound at the streaming rate measured in this run (`measured_ceilings`).
        "over_measured_bound": round(step_s * measured["stream_bytes_per_s"] / read["total"], 3),
        "target": {
            "max_over_bound": DECODE_BOUND_FACTOR,
            "met": None if ratio is None else bool(ratio <= DECODE_BOUND_FACTOR),
        },
    }


def measure_gpu(
    *,
    tiny: bool = False,
    peak_flops: float | None = None,
    hbm_bandwidth: float | None = None,
    reps: int = 5,
    batch: int | None = None,
    param_dtype: str = "float32",
    seed: int = 0,
    profile_dir: str | None = None,
) -> dict:
    """The three accelerator figures (module docstring) for the 0.5B model, or the tiny one; with
    `profile_dir`, also one profiled call of the sampler and of the rest (`bench.profile`), their
    traces written there and their costliest ops reported."""
    import jax
    import jax.numpy as jnp

    from ctxjax.model import Numerics

    t_start = time.perf_counter()
    setup = _gpu_setup(tiny, reps, batch)
    model = TINY_MODEL if tiny else GPU_MODEL
    numerics = Numerics(param_dtype=param_dtype, compute_dtype="bfloat16", remat=False)
    device = jax.devices()[0]
    spec = device_spec(device.device_kind)
    peak, peak_source = _limit(peak_flops, spec and spec.peak_flops, spec, "--peak-flops")
    hbm, hbm_source = _limit(hbm_bandwidth, spec and spec.hbm_bytes_per_s, spec, "--hbm-bandwidth")
    copts = measure.QUICK_COMPILER_OPTIONS if tiny else None

    b, c, p, n = (setup[k] for k in ("batch", "context_len", "prompt_len", "new_tokens"))
    built = _build(model, numerics, seed)
    cfg, state, teacher_params = built.cfg, built.state, built.teacher_params
    batch_np = measure._train_batch(np.random.default_rng(seed), cfg.vocab_size, b, p, c + p)
    data = {k: jnp.asarray(v) for k, v in batch_np.items()}
    rng = jax.random.key(seed)
    # The step and the rest donate their state; the sampler reads a copy of the parameters.
    sample_params = jax.tree.map(jnp.copy, state.params)
    compiled, compile_s = _compile_all(
        _lower_programs(built, setup, data, rng, sample_params), copts
    )

    sample_args = (sample_params, data["prompt_ids"], data["prompt_mask"], rng)
    rollout = compiled["sample"](*sample_args)
    rest_args = (teacher_params, data, rollout.tokens_BxN, rollout.mask_BxN)
    args = {k: rest_args for k in compiled if k.startswith("rest:")}
    args["step"] = (teacher_params, data, rng)
    memory, state = _memory(compiled, state, args, device)
    times, state = _gpu_times(compiled, state, args, sample_args, reps)
    timing = {k: measure._timing(ts, b * n) for k, ts in times.items()}
    xla_rest = measure._xla_flops(compiled[f"rest:{_variant(False, 0)}"])
    measured = measured_ceilings(tiny, reps=max(reps, 3))
    profiles = None
    if profile_dir is not None:
        profiles = _profile_parts(compiled, state, sample_args, rest_args, profile_dir)
    return {
        "benchmark": "gpu",
        "tiny": tiny,
        "environment": _gpu_environment(device, copts),
        "device": {
            "spec": spec and spec.name,
            "peak_flops": peak,
            "peak_flops_source": peak_source,
            "hbm_bytes_per_s": hbm,
            "hbm_source": hbm_source,
            "measured": measured,
        },
        "setup": _setup_record(model, cfg, numerics, setup, reps),
        "compile_s": round(compile_s, 3),
        "train": _train_figures(cfg, setup, timing, xla_rest, peak, spec, measured),
        "decode": _decode_figures(cfg, numerics, setup, timing, hbm, measured),
        "memory": {"device_peak_available": _device_peak(device) is not None, "programs": memory},
        "profile": profiles,
        "wall_s": round(time.perf_counter() - t_start, 2),
    }


def _gpu_setup(tiny: bool, reps: int, batch: int | None) -> dict:
    """The run's sizes (the tiny or the 0.5B preset, `batch` overriding its batch), checked."""
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    setup = dict(TINY_SETUP if tiny else GPU_SETUP)
    if batch is not None:
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        setup["batch"] = batch
    return setup


def _setup_record(model: dict, cfg, numerics, setup: dict, reps: int) -> dict:
    """What the run measured: the model, its dtypes, the sizes, the sampling and the loss."""
    from ctxjax.config import LossConfig

    return {
        "model": model,
        "num_params": cfg.num_params(),
        "param_dtype": numerics.param_dtype,
        "compute_dtype": numerics.compute_dtype,
        **setup,
        "ctx_prompt_len": setup["context_len"] + setup["prompt_len"],
        "temperature": 1.0,
        "eos": None,
        "loss": dataclasses.asdict(LossConfig()),
        "reps": reps,
    }


def _gpu_times(compiled: dict, state, args: dict, sample_args: tuple, reps: int):
    """({part: seconds of each of `reps` calls}, the state after them): the step and the rest
    chained on their donated state, the sampler with all `new_tokens` and with one."""
    step_times, state = _time_chained(compiled["step"], state, args["step"], reps)
    rest_key = f"rest:{_variant(False, 0)}"
    rest_times, state = _time_chained(compiled[rest_key], state, args[rest_key], reps)
    times = {
        "step": step_times,
        "sample": _times(compiled["sample"], sample_args, reps),
        "rest": rest_times,
        "sample_1": _times(compiled["sample_1"], sample_args, reps),
    }
    return times, state


def _profile_parts(compiled: dict, state, sample_args, rest_args, profile_dir: str) -> dict:
    """One profiled call of the sampler and of the rest, traces under `profile_dir`."""
    rest_call = functools.partial(compiled[f"rest:{_variant(False, 0)}"], state, *rest_args)
    return {
        "sample": profile.profile_call(
            lambda: compiled["sample"](*sample_args), os.path.join(profile_dir, "sample")
        )[1],
        # The last use of the donated state.
        "rest": profile.profile_call(rest_call, os.path.join(profile_dir, "rest"))[1],
    }


def _gpu_environment(device, copts: dict | None) -> dict:
    """The host, jax and the device a `gpu` result was measured on."""
    import jax

    return {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": environment.machine(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "compiler_options": copts or {},
    }


def _tflops(x: float) -> str:
    return f"{x / 1e12:.4g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _verdict(met: bool | None, why_none: str) -> str:
    return why_none if met is None else ("met" if met else "NOT met")


def print_gpu(r: dict) -> None:
    """The accelerator benchmark: MFU by part, decode vs the HBM bound, memory by variant."""
    _print_gpu_device(r)
    _print_gpu_train(r)
    _print_gpu_decode(r)
    _print_gpu_memory(r)
    _print_gpu_profiles(r)


def _print_gpu_device(r: dict) -> None:
    """The device, the model, and the ceilings (datasheet and measured) the rates are held to."""
    env, dev, s = r["environment"], r["device"], r["setup"]
    m = s["model"]
    print(
        f"gpu benchmark on {env['device_kind']} ({env['backend']}, jax {env['jax']}): "
        f"{'TINY ' if r['tiny'] else ''}{m['family']} {s['num_params'] / 1e6:.1f}M params "
        f"({m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}), "
        f"params {s['param_dtype']}, compute {s['compute_dtype']}; compile {r['compile_s']:.1f} s, "
        f"wall {r['wall_s']:.1f} s"
    )
    if dev["peak_flops"] is None:
        print(
            f"  peak bf16 FLOP/s: UNKNOWN for device kind {env['device_kind']!r} "
            "(pass --peak-flops): MFU not computed"
        )
    else:
        print(f"  peak bf16: {dev['peak_flops'] / 1e12:.0f} TFLOP/s ({dev['peak_flops_source']})")
    if dev["hbm_bytes_per_s"] is None:
        print(
            f"  HBM bandwidth: UNKNOWN for device kind {env['device_kind']!r} "
            "(pass --hbm-bandwidth): no decode bound"
        )
    else:
        print(f"  HBM: {dev['hbm_bytes_per_s'] / 1e12:.2f} TB/s ({dev['hbm_source']})")
    ms = dev["measured"]
    print(
        f"  measured in this run: bf16 {ms['matmul_n']}^3 matmul "
        f"{ms['matmul_flops_per_s'] / 1e12:.4g} TFLOP/s, streaming (x + 1, "
        f"{ms['stream_bytes'] / 2**20:.0f} MiB moved) {ms['stream_bytes_per_s'] / 1e12:.4g} TB/s"
    )


def _print_gpu_train(r: dict) -> None:
    """The train step by part: time, FLOPs, MFU, and the target on the rest of the step."""
    s, t = r["setup"], r["train"]
    print(
        f"train step: batch {s['batch']}, [c|x] {s['ctx_prompt_len']} / [x] {s['prompt_len']} "
        f"slots, {s['new_tokens']} new tokens at T={s['temperature']} (no EOS), loss "
        f"{s['loss']['opd']}+{s['loss']['consistency']}, no remat, unchunked; "
        f"median of {s['reps']}"
    )
    print(
        f"  {'part':10s}{'median s':>10s}{'TFLOP':>10s}{'TFLOP/s':>10s}{'MFU':>8s}"
        f"{'of meas.':>9s}  target"
    )
    target = t["target"]
    rest_target = (
        f">= {target['rest_mfu_min']:.0%} on {'/'.join(target['applies_to'])}: "
        + _verdict(target["met"], "n/a on this device")
    )
    for name in ("sample", "rest", "step"):
        rate, row = t["rates"][name], t["timing"][name]
        print(
            f"  {name:10s}{row['median_s']:10.4f}{_tflops(rate['flops']):>10s}"
            f"{_tflops(rate['flops_per_s']):>10s}{_pct(rate['mfu']):>8s}"
            f"{_pct(rate['of_measured_peak']):>9s}"
            f"  {rest_target if name == 'rest' else ''}"
        )
    print(
        f"  sample + rest {t['sum_of_parts_s']:.4f} s; rest FLOPs by XLA's cost analysis "
        f"{_tflops(t['flops_xla_rest'])} T (it leaves out library calls such as a GPU's cuBLAS "
        f"GEMMs), analytic {_tflops(t['rates']['rest']['flops'])} T (matmuls only, remat "
        "recompute not counted)"
    )


def _print_gpu_decode(r: dict) -> None:
    """One decode step against the bytes it must read at the HBM bandwidth."""
    d = r["decode"]
    read = d["bytes_per_step"]
    line = (
        f"decode: batch {d['batch']}, {d['cache_slots']} cache slots; {1e3 * d['step_s']:.3f} ms "
        f"per step = {d['tokens_per_s']} tokens/s; a step reads {read['total'] / 2**20:.1f} MiB "
        f"(weights {read['weights'] / 2**20:.1f}, KV cache {read['kv_cache'] / 2**20:.1f})"
    )
    if d["bound_step_s"] is None:
        print(line + "; HBM bound unknown")
    else:
        print(
            line + f"; HBM bound {1e3 * d['bound_step_s']:.3f} ms = {d['bound_tokens_per_s']} "
            f"tokens/s; measured {d['over_bound']}x the bound (target <= "
            f"{d['target']['max_over_bound']:.0f}x: {_verdict(d['target']['met'], '?')}); "
            f"{d['over_measured_bound']}x the bound at the measured streaming rate"
        )


def _print_gpu_memory(r: dict) -> None:
    """Peak memory of each compiled program: the device's count and XLA's estimate."""
    mem = r["memory"]
    source = (
        'memory_stats()["peak_bytes_in_use"]'
        if mem["device_peak_available"]
        else "not available on this device"
    )
    print(
        "peak memory: the rest of the step by variant (remat and the chunked loss act there) and "
        f"the whole step; device peak: {source}; XLA estimate: args + out + temp - donated"
    )
    print(
        f"  {'program':22s}{'device peak MiB':>16s}{'XLA est MiB':>13s}{'temp MiB':>10s}"
        f"{'1st call s':>11s}"
    )
    for name, row in mem["programs"].items():
        dev_peak = row["device_peak_bytes"]
        peak_cell = "-" if dev_peak is None else f"{dev_peak / 2**20:.1f}"
        if row["peak_is_upper_bound"]:
            peak_cell = "<=" + peak_cell
        print(
            f"  {name:22s}{peak_cell:>16s}{row['estimate_bytes'] / 2**20:13.1f}"
            f"{row['temp_bytes'] / 2**20:10.1f}{row['first_call_s']:11.3f}"
        )


def _print_gpu_profiles(r: dict) -> None:
    """The profiled calls' kernels by kind and the top ones by time (with `--profile`)."""
    for part, prof in (r.get("profile") or {}).items():
        print(
            f"profile of one {part} call ({prof['source']}: {prof['events']} events, busy "
            f"{prof['busy_s']:.4f} s over a {prof['span_s']:.4f} s span; trace {prof['trace']}):"
        )
        print("  by kind: " + ", ".join(f"{c} {x:.1%}" for c, x in prof["categories"].items()))
        for row in prof["top"][:12]:
            print(
                f"  {row['share']:7.1%} {row['total_s']:9.5f} s {row['calls']:6d}x  "
                f"{row['kernel'][:70]}"
            )
