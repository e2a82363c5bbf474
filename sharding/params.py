"""Parameters created and restored sharded: the full model never sits on one device."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mixtral_jax import checkpoint
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model import Mixtral
from mixtral_jax.sharding.mesh import check_divisible
from mixtral_jax.sharding.rules import PARAM_RULES


def param_shardings(model_or_state, mesh: Mesh):
    """NamedShardings (parameter view) shaped like `nnx.state(model, nnx.Param)`
    (or like the given state, which may hold any variables)."""
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    with nnx.logical_axis_rules(PARAM_RULES):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def abstract_model(config: MixtralConfig, mesh: Mesh) -> Mixtral:
    """The model with every parameter a ShapeDtypeStruct carrying its sharding on `mesh` (no memory)."""
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state = checkpoint.abstract_arrays(state, param_shardings(state, mesh))
    return nnx.merge(graphdef, state)


def init_model(config: MixtralConfig, mesh: Mesh, seed: int = 0) -> Mixtral:
    """A freshly initialised model whose parameters are created already sharded.

    Same values as `mixtral_jax.init(config, seed)` (JAX's partitionable
    random numbers do not depend on the sharding).
    """
    check_divisible(mesh, config)
    graphdef, state = nnx.split(abstract_model(config, mesh))

    def create():
        return nnx.state(Mixtral(config, rngs=nnx.Rngs(seed)))

    create = jax.jit(create, out_shardings=jax.tree.map(lambda x: x.sharding, state))
    return nnx.merge(graphdef, create())


def restore_model(path, mesh: Mesh, **config_changes) -> Mixtral:
    """The parameters of a mixtral-jax checkpoint restored straight into shards on `mesh`
    (any mesh: not necessarily the one that wrote it). `config_changes` edit
    fields that do not change shapes (dtype, moe_impl, capacity_factor...)."""
    config = checkpoint.read_model_config(path)
    if config_changes:
        config = config.replace(**config_changes)
    check_divisible(mesh, config)
    return checkpoint.restore_params(path, abstract_model(config, mesh))
