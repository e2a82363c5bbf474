"""The `mesh:` and `distributed:` sections of a run config."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 (the rest of the devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host settings for `jax.distributed.initialize` (all None: single process,
    or auto-detected where the platform provides them, e.g. TPU pods and SLURM)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # call jax.distributed.initialize() with the platform's own settings
