"""Test setup: eight simulated CPU devices (set before JAX is imported) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# kernels the tests call outside a model compute exact float32 on GPUs too (models set their own
# precision: MixtralConfig.matmul_precision)
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "float32")


