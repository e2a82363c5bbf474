"""Multi-host start-up with JAX's own distributed runtime."""

from __future__ import annotations

import jax

from mixtral_jax.configtools import UserError
from mixtral_jax.sharding.config import DistributedConfig


def initialize_distributed(dist: DistributedConfig) -> None:
    """Joins this process to a multi-process job; a no-op for a single process.

    `auto: true` lets JAX read the platform's own settings (TPU pods, SLURM,
    Open MPI); otherwise coordinator, num_processes and process_id are all
    required. Must run before anything touches a JAX device.
    """
    if dist.auto:
        jax.distributed.initialize()
        return
    given = {"coordinator": dist.coordinator, "num_processes": dist.num_processes,
             "process_id": dist.process_id}
    if all(v is None for v in given.values()) or dist.num_processes == 1:
        return
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UserError(f"distributed: {', '.join('distributed.' + k for k in missing)} must be set "
                        f"for a multi-process run (or set distributed.auto=true)")
    if not 0 <= dist.process_id < dist.num_processes:
        raise UserError(f"distributed.process_id={dist.process_id} is not in "
                        f"[0, num_processes={dist.num_processes})")
    # CPU devices of different processes talk through gloo (GPU/TPU ignore this setting).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(dist.coordinator, num_processes=dist.num_processes,
                               process_id=dist.process_id)


def is_main_process() -> bool:
    """True on process 0, the one that writes logs."""
    return jax.process_index() == 0
