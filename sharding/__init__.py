"""Meshes, logical-axis rules, sharded parameters, the expert-parallel MoE and multi-host start-up.

    mesh = sharding.make_mesh(MeshConfig(data=2, expert=4))
    model = sharding.init_model(config, mesh)
    with sharding.use_mesh(mesh):
        out = jax.jit(step)(...)  # model.forward(..., experts_fn=sharding.experts_fn(mesh, config))
"""

from mixtral_jax.sharding.config import DistributedConfig, MeshConfig
from mixtral_jax.sharding.distributed import initialize_distributed, is_main_process
from mixtral_jax.sharding.experts import capacity, experts_fn
from mixtral_jax.sharding.mesh import (batch_devices, batch_sharding, cache_sharding, check_divisible,
                                       make_mesh, shard_batch, use_mesh)
from mixtral_jax.sharding.params import abstract_model, init_model, param_shardings, restore_model
from mixtral_jax.sharding.rules import BATCH_AXES, COMPUTE_RULES, MESH_AXES, PARAM_RULES, logical_to_spec

__all__ = [
    "BATCH_AXES", "COMPUTE_RULES", "DistributedConfig", "MESH_AXES", "MeshConfig", "PARAM_RULES",
    "abstract_model", "batch_devices", "batch_sharding", "cache_sharding", "capacity",
    "check_divisible", "experts_fn", "init_model", "initialize_distributed", "is_main_process",
    "logical_to_spec", "make_mesh", "param_shardings", "restore_model", "shard_batch", "use_mesh",
]
