"""Mixtral, the sparse mixture-of-experts language model, in JAX and Flax."""

from mixtral_jax.config import PRESETS, ConfigError, MixtralConfig, preset
from mixtral_jax.model import Mixtral, ModelOutput, init

__all__ = ["ConfigError", "Mixtral", "MixtralConfig", "ModelOutput", "PRESETS", "init", "preset"]
