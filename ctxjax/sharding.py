"""Device mesh, the partition-rule table, batch placement and multi-host start-up.

Three mesh axes: `data` (pure data parallelism), `fsdp` (batch split *and* parameters sharded along
their model-width dimension, gathered per layer by XLA), `tensor` (heads / MLP width / vocabulary).
Parameters get their layout from one table of (regex on the parameter path, PartitionSpec) rules;
a dimension that the mesh axis does not divide is replicated instead (a tiny model on many devices).
"""

from __future__ import annotations

import logging
import os
import re

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Kernels are [in, out]. Attention and MLP input projections split their output (heads / MLP width)
# over `tensor` and their input (model width) over `fsdp`; output projections the other way round.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"o_proj/kernel$", P("tensor", "fsdp")),
    (r"(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),
    (r"(gate_proj|up_proj)/bias$", P("tensor")),
    (r"down_proj/kernel$", P("tensor", "fsdp")),
    (r".*", P()),  # norms, other biases, scalars: replicated
)
# With `numerics.scan_layers` a block parameter is stacked, [num_layers, *its per-layer shape], and
# its path has no layer index (`layers/mlp/up_proj/kernel`): it takes its per-layer rule behind an
# unsplit layer axis, so each scan step reads one layer laid out as an unrolled model's.
STACKED_LAYERS = r"(^|/)layers/(?!\d+(/|$))"

log = logging.getLogger(__name__)


def _env_int(env, name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ValueError(
            f"environment variable {name} must be an integer, got {env[name]!r}"
        ) from None


def distributed_launcher(env=os.environ) -> str | None:
    """Which multi-process launch `env` describes: "explicit" (JAX_COORDINATOR_ADDRESS), "slurm",
    "openmpi", "tpu", or None for a single process.

    Only a job of more than one process counts. A SLURM allocation alone (`salloc`, an sbatch
    script outside `srun`) sets SLURM_JOB_ID but starts no task, and `srun -n 1` starts one: a
    plain single-process run in either, which `jax.distributed.initialize()` could not configure
    (no step node list) or would not need.
    """
    if "JAX_COORDINATOR_ADDRESS" in env:
        return "explicit"
    if "SLURM_STEP_NODELIST" in env:
        tasks = _env_int(env, "SLURM_STEP_NUM_TASKS", _env_int(env, "SLURM_NTASKS", 1))
        if tasks > 1:
            return "slurm"
    if _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "openmpi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    return None


def maybe_initialize_distributed() -> None:
    """Starts JAX's multi-host runtime when the environment describes a multi-process job
    (`distributed_launcher`).

    On a single host nothing is needed and nothing happens. On TPU pods and SLURM/OpenMPI clusters
    `jax.distributed.initialize()` discovers its peers by itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. With JAX_PLATFORMS=cpu the
    processes exchange data over Gloo.
    """
    launcher = distributed_launcher()
    if launcher is None or jax.distributed.is_initialized():
        return
    kwargs = {}
    if launcher == "explicit":
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: set all three for a multi-process run"
            )
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=_env_int(os.environ, "JAX_NUM_PROCESSES", 1),
            process_id=_env_int(os.environ, "JAX_PROCESS_ID", 0),
        )
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        # CPU processes (a loopback test, a CPU cluster) need a cross-process collectives backend;
        # the default one only reaches the devices of its own process.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("starting JAX's multi-process runtime (%s launch)", launcher)
    jax.distributed.initialize(**kwargs)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: list | None = None
) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (the rest of them)."""
    devices = devices if devices is not None else jax.devices()
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got mesh {dict(zip(AXES, sizes, strict=True))}"
        )
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh {dict(zip(AXES, sizes, strict=True))} does not divide {n} devices"
            )
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"have {n}"
        )
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), AXES, axis_types=auto, devices=devices)


def _path_str(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(key))
    # An nnx Variable flattens to one leaf under the attribute `value`; the rules name the variable
    # itself (`.../q_proj/kernel`), so without this nothing but the catch-all would ever match.
    if parts and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """The first matching rule's spec, with axes the dimension can't be split over dropped."""
    # The catch-all last rule always matches.
    spec = next(spec for pattern, spec in PARTITION_RULES if re.search(pattern, path))
    if re.search(STACKED_LAYERS, path):
        spec = P(None, *spec)
    if len(spec) > len(shape):
        spec = P()
    fixed = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axis is not None and dim % mesh.shape[axis]:
            log.info(
                "replicating %s dim %d (size %d) instead of splitting it over %s=%d",
                path,
                len(fixed),
                dim,
                axis,
                mesh.shape[axis],
            )
            axis = None
        fixed.append(axis)
    return P(*fixed)


def param_shardings(state, mesh: jax.sharding.Mesh):
    """NamedShardings for a params pytree (nnx.State or plain arrays / ShapeDtypeStructs)."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(_path_str(path), tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, state)


def shard_params(state, mesh: jax.sharding.Mesh):
    """Places an existing params pytree on the mesh by the rule table."""
    return jax.device_put(state, param_shardings(state, mesh))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def process_rows(mesh: jax.sharding.Mesh, global_rows: int) -> np.ndarray:
    """The rows of a `[global_rows, ...]` batch split over (data, fsdp) that this process's devices
    hold, ascending: the local slice `place_batch` expects. Every process iterates the same global
    batches and encodes only these rows, so the global batch does not depend on the process
    count."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
    spans = sorted({idx[0].indices(global_rows)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in spans])


def place_batch(batch: dict, mesh: jax.sharding.Mesh, global_rows: int | None = None) -> dict:
    """Puts a numpy batch on the mesh, split over (data, fsdp) along its first axis.

    `batch` holds this process's rows (`process_rows(mesh, global_rows)`) of a global batch of
    `global_rows`; None: it holds the whole global batch (then identical on every process).
    """

    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        shape = (global_rows or x.shape[0], *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return {k: put(v) for k, v in batch.items()}


def gather_to_host(tree):
    """The whole of every array, readable on this process: parameters sharded over other hosts'
    devices (fsdp or tensor spanning hosts) can't be fetched by one process alone. Multi-process,
    every process must call it (numpy copies of the full arrays); one process: `tree` as it is."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])
