"""Mixtral, the sparse mixture-of-experts language model, in JAX and Flax.

The public names are imported on first use, so `mixtral-jax --help` and the
tokenizer answer without importing JAX.
"""

import importlib

_EXPORTS = {
    "MixtralConfig": "mixtral_jax.config",
    "ConfigError": "mixtral_jax.config",
    "PRESETS": "mixtral_jax.config",
    "preset": "mixtral_jax.config",
    "Mixtral": "mixtral_jax.model",
    "ModelOutput": "mixtral_jax.model",
    "init": "mixtral_jax.model",
    "Tokenizer": "mixtral_jax.tokenizer",
    "load": "mixtral_jax.loading",
    "save_params": "mixtral_jax.checkpoint",
    "from_params": "mixtral_jax.loading",
    "generate": "mixtral_jax.infer",
    "Completion": "mixtral_jax.infer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mixtral_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
