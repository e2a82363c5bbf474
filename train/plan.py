"""Ahead-of-time memory plans: compile the real training step (and a decode step) for a
mesh of simulated devices with abstract arrays, allocating nothing, and read XLA's
per-device memory figures.

Compiled for CPU devices, so the temporaries are XLA:CPU's buffer assignment; a
TPU or GPU compile fuses differently, but parameters, optimizer state and batch
are exact, and the activation figure is the right order of magnitude.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.checkpoint import abstract_arrays
from mixtral_jax.config import MixtralConfig
from mixtral_jax.sharding import experts_fn
from mixtral_jax.sharding.mesh import batch_sharding, cache_sharding, check_divisible, use_mesh
from mixtral_jax.sharding.params import abstract_model
from mixtral_jax.train.step import StateLayout, abstract_train_state, make_optimizer, make_train_step

GIB = 2**30
ACCELERATORS = {"tpu-v5e": 16 * GIB, "h100": 80 * GIB, "tpu-v5p": 95 * GIB}  # HBM per chip


def per_device_bytes(tree) -> int:
    """Bytes the fullest device holds of a tree of sharded abstract arrays."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _compiled_figures(compiled, parts: dict[str, int]) -> dict:
    """The given per-device input parts, XLA's temporaries, the total, and which chips it fits."""
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes)
    return {**parts, "temporaries": int(memory.temp_size_in_bytes), "total": int(total),
            "total_gib": round(total / GIB, 2),
            "fits": {name: total <= size for name, size in ACCELERATORS.items()}}


def plan_training(config: MixtralConfig, mesh: Mesh, train_cfg) -> dict:
    """Per-device bytes of one training step (`mixtral_jax.train.step`, AdamW) on `mesh`."""

    check_divisible(mesh, config, batch_size=train_cfg.micro_batch_size)
    optimizer = make_optimizer(train_cfg)
    graphdef, state, shardings = abstract_train_state(config, mesh, optimizer)
    layout = StateLayout(train_cfg, config.num_hidden_layers, shardings)  # as the training loop keeps it
    state = layout.for_steps(state)
    rows = batch_sharding(mesh)
    shape = (train_cfg.batch_size, train_cfg.seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
             for name in ("inputs", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=rows)
    step = make_train_step(graphdef, optimizer, train_cfg, experts_fn=experts_fn(mesh, config),
                           shardings=layout.shardings, batch_sharding=rows,
                           metrics_sharding=NamedSharding(mesh, PartitionSpec()))
    with use_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    return _compiled_figures(compiled, {"parameters": per_device_bytes(state.params),
                                        "optimizer_state": per_device_bytes(state.opt_state),
                                        "batch": per_device_bytes(batch)})


def plan_decode(config: MixtralConfig, mesh: Mesh, batch_size: int, context: int) -> dict:
    """Per-device bytes of one decode step: `batch_size` new tokens against a KV cache of
    `context` slots (rows over data/fsdp/expert, kv heads over tensor), cache donated."""
    check_divisible(mesh, config, batch_size=batch_size)
    graphdef, params = nnx.split(abstract_model(config, mesh))
    model = nnx.merge(graphdef, params)
    cache = abstract_arrays(jax.eval_shape(lambda: model.init_cache(batch_size, context)), cache_sharding(mesh))
    tokens = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32, sharding=batch_sharding(mesh))
    ep = experts_fn(mesh, config)

    def step(params, cache, tokens):
        positions = jnp.max(cache.pos[0], axis=1, keepdims=True) + 1  # [B, 1]
        out = nnx.merge(graphdef, params).forward(tokens, positions, cache=cache, experts_fn=ep)
        return out.logits[:, -1], out.cache

    with use_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=1).lower(params, cache, tokens).compile()
    return _compiled_figures(compiled, {"parameters": per_device_bytes(params),
                                        "kv_cache": per_device_bytes(cache)})


def plan(config: MixtralConfig, mesh: Mesh, train_cfg, decode_batch: int, decode_context: int) -> dict:
    """The training and decode plans with their compile times."""
    start = time.perf_counter()
    report = {"train": plan_training(config, mesh, train_cfg)}
    report["train"]["compile_seconds"] = round(time.perf_counter() - start, 1)
    if decode_batch:
        start = time.perf_counter()
        report["decode"] = plan_decode(config, mesh, decode_batch, decode_context)
        report["decode"]["compile_seconds"] = round(time.perf_counter() - start, 1)
    return report
