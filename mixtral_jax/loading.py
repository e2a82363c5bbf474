"""`load(path)`: a model from a Hugging Face Mixtral directory or a mixtral-jax checkpoint."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import hf
from mixtral_jax.checkpoint import load_checkpoint, param_shapes, shape_mismatch
from mixtral_jax.configtools import UserError
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model import Mixtral


def load(path: str | pathlib.Path, **config_changes) -> Mixtral:
    """The model stored at `path`, on the default device.

    `path` is a Hugging Face Mixtral directory (config.json + model.safetensors,
    or shards listed in model.safetensors.index.json) or a mixtral-jax
    checkpoint (a run directory, its checkpoints/ folder, or one step folder).
    `config_changes` override config fields that keep the parameter shapes,
    e.g. `dtype="bfloat16"`, `param_dtype="float32"`, `moe_impl="reference"`.
    """
    path = pathlib.Path(path).expanduser()
    if not (path / hf.HF_CONFIG).is_file():
        return load_checkpoint(path, **config_changes)
    config = hf.read_hf_config(path).replace(**config_changes)
    return from_params(config, hf.read_hf_params(path, config))


def from_params(config: MixtralConfig, params: dict) -> Mixtral:
    """A model of `config` holding `params` (a `checkpoint.param_tree`-shaped dict of
    numpy or JAX arrays, cast to `config.param_dtype`) instead of initialising them; UserError
    naming the first parameter that is missing, extra, or of another shape."""
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    mismatch = shape_mismatch(param_shapes(params), param_shapes(nnx.to_pure_dict(state)), "params")
    if mismatch:
        raise UserError(f"params do not match the model config: {mismatch}")
    dtype = jnp.dtype(config.param_dtype)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
    nnx.update(model, state)
    return model
