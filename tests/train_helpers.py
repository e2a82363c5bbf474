"""Shared by the training tests: a compile cache kept across runs and processes, and the
overrides that make `configs/tiny.yaml` runs quick."""

import os
import tempfile

import jax

COMPILE_CACHE = os.path.join(tempfile.gettempdir(), "mixtral-jax-test-compile-cache")
QUICK = ["train.peak_flops=1.0e11"]  # a given peak: no matmul timing at start-up


def use_compile_cache() -> dict:
    """Turns on JAX's persistent compile cache in this process; returns the environment
    variables that turn it on in a child process."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    return {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
