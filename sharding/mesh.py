"""Device meshes from the run config, the checks that run before anything
compiles, the mesh + logical-rules context, and placing input batches."""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from mixtral_jax.config import MixtralConfig
from mixtral_jax.configtools import UserError
from mixtral_jax.layers import HEAD_DIM, KV_HEADS, LAYERS, KVCache
from mixtral_jax.sharding.config import MeshConfig
from mixtral_jax.sharding.rules import BATCH_AXES, COMPUTE_RULES, MESH_AXES, logical_to_spec


def _describe(sizes) -> str:
    return " ".join(f"{name}={size}" for name, size in zip(MESH_AXES, sizes))


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """A mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all, every process).

    One size may be -1: it takes the devices the others leave. A shape whose
    product is not the device count is a UserError.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [getattr(mesh_cfg, name) for name in MESH_AXES]
    for name, size in zip(MESH_AXES, sizes):
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise UserError(f"mesh.{name} must be a positive integer or -1, got {size!r}")
    if sizes.count(-1) > 1:
        raise UserError(f"mesh: only one axis may be -1, got {_describe(sizes)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise UserError(f"mesh {_describe(sizes)}: {len(devices)} devices are not a multiple "
                            f"of the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = len(devices) // fixed
    elif fixed != len(devices):
        raise UserError(f"mesh {_describe(sizes)} needs {fixed} devices, but {len(devices)} are available")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_devices(mesh: Mesh) -> int:
    """How many ways the batch is split: data x fsdp x expert."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_divisible(mesh: Mesh, config: MixtralConfig, batch_size: int | None = None) -> None:
    """One UserError naming every model (or batch) size that the mesh axis sharding it does not divide."""
    splits = [
        ("num_local_experts", config.num_local_experts, "expert"),
        ("num_attention_heads", config.num_attention_heads, "tensor"),
        ("num_key_value_heads", config.num_key_value_heads, "tensor"),
        ("intermediate_size", config.intermediate_size, "tensor"),
        ("vocab_size", config.vocab_size, "tensor"),
        ("hidden_size", config.hidden_size, "fsdp"),
    ]
    problems = [f"model.{name}={size} is not divisible by mesh.{axis}={mesh.shape[axis]}"
                for name, size, axis in splits if size % mesh.shape[axis]]
    if batch_size is not None and batch_size % batch_devices(mesh):
        problems.append(f"batch size {batch_size} is not divisible by data x fsdp x expert = "
                        f"{batch_devices(mesh)}")
    if problems:
        raise UserError("mesh does not fit: " + "; ".join(problems))


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Makes `mesh` current and the compute-view logical rules active, so that
    `layers.constrain` pins activations in code traced inside."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(COMPUTE_RULES):
        yield


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a token array [B, T, ...]: rows over (data, fsdp, expert), the rest whole."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from each process's own rows (every process passes the same number of rows);
    UserError when the global rows do not divide among the mesh's batch devices."""
    for name, rows in local_batch.items():
        if (len(rows) * jax.process_count()) % batch_devices(mesh):
            raise UserError(f"{name}: {len(rows) * jax.process_count()} rows are not divisible by "
                            f"data x fsdp x expert = {batch_devices(mesh)}")
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(rows)), rows)
            for name, rows in local_batch.items()}


def cache_sharding(mesh: Mesh) -> KVCache:
    """Shardings of a stacked KV cache (k [L, B, K, H, S], v [L, B, K, S, H], pos [L, B, S]):
    rows like the batch, kv heads over tensor."""
    spec = lambda *axes: NamedSharding(mesh, logical_to_spec((LAYERS, "batch", *axes)))
    return KVCache(spec(KV_HEADS, HEAD_DIM, "seq"), spec(KV_HEADS, "seq", HEAD_DIM), spec("seq"))
