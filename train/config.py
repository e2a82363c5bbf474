"""The run config: one frozen dataclass per YAML section, read with `configtools`.

    model:        a `preset:` name plus field overrides (see mixtral_jax.config)
    mesh:         data / fsdp / expert / tensor axis sizes
    distributed:  coordinator / num_processes / process_id (multi-host)
    data:         what to read (mixtral_jax.train.data.DataConfig)
    train:        TrainConfig below
    checkpoint:   CheckpointConfig below
    run_dir:      where config.yaml, metrics.jsonl, TensorBoard files and checkpoints/ go
    init_from:    a checkpoint (converted or a run dir) whose parameters start the run
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Literal

from mixtral_jax import checkpoint, configtools
from mixtral_jax.config import ConfigError, MixtralConfig, from_section
from mixtral_jax.configtools import UserError
from mixtral_jax.sharding.config import DistributedConfig, MeshConfig
from mixtral_jax.train.data import DataConfig

DEFAULT_CONFIG = "default"  # configs/default.yaml: what `mixtral-jax train` runs with no --config


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings. `batch_size` is global (all processes), in sequences
    per optimizer step; with `grad_accum` > 1 each step runs that many micro-batches of
    batch_size / grad_accum sequences and sums their gradients."""

    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = 100  # steps of linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine / linear decay ends at lr * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); never applied to RMSNorm scales
    clip: float = 1.0  # global gradient-norm clip; 0 turns it off
    seed: int = 0  # parameter init and data order
    log_every: int = 10
    layer_loop: Literal["auto", "scan", "unroll"] = "auto"  # auto: unrolled on CPU up to 4 layers (step.unrolls_layers)
    skip_nonfinite: bool = False  # skip a batch whose loss or gradient is NaN/inf instead of stopping
    reset_optimizer: bool = True  # with init_from: a fresh optimizer (false: also restore its opt_state)
    peak_flops: float | None = None  # all devices together, for MFU; None: measured on CPU, else no MFU
    sample_tokens: int = 0  # at the end, generate this many tokens from `sample_prompt` (0: none)
    sample_prompt: str = "The"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            _check(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "warmup", "weight_decay", "clip", "eps", "sample_tokens"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "train.b1 and train.b2 must be in [0, 1)")
        _check(self.peak_flops is None or self.peak_flops >= 0,
               f"train.peak_flops must be >= 0 (0: no MFU), got {self.peak_flops}")
        _check(0 <= self.seed < 2**32, f"train.seed must be in [0, 2**32), got {self.seed}")
        _check(self.batch_size % self.grad_accum == 0,
               f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum "
               f"({self.grad_accum})")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch (one forward/backward pass)."""
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in `run_dir/checkpoints`: every `every` steps, the last `keep` kept,
    plus one at the end and one on SIGTERM or SIGINT."""

    every: int = 500
    keep: int = 3
    async_save: bool = True  # write in the background while training goes on

    def __post_init__(self):
        _check(self.every > 0, f"checkpoint.every must be positive, got {self.every}")
        _check(self.keep > 0, f"checkpoint.keep must be positive, got {self.keep}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run, as read from YAML plus overrides."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run_dir: str | None = None  # None: runs/<config name>
    init_from: str | None = None

    @property
    def model_config(self) -> MixtralConfig:
        """The `model:` section as a MixtralConfig. With `init_from` and no `preset:`, the
        checkpoint's own config is the base and the section's fields override it;
        `data.tokenizer`, when set, is recorded as the model's tokenizer."""
        section = dict(self.model)
        if self.data.tokenizer is not None:
            section["tokenizer"] = self.data.tokenizer
        if self.init_from is not None and "preset" not in section:
            section = {**checkpoint.read_model_config(self.init_from).to_dict(), **section}
        return from_section(section)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with the model section spelled out (what config.yaml holds)."""
        return {**configtools.to_dict(self), "model": self.model_config.to_dict()}


def load_run_config(path_or_name: str | None, overrides: list[str] = ()) -> RunConfig:
    """The run config from a YAML file or bundled name (None: configs/default.yaml) plus
    dotted overrides; every key and value is checked here, before anything compiles."""
    name = path_or_name or DEFAULT_CONFIG
    run = configtools.build(RunConfig, configtools.load(name, overrides))
    try:
        model = run.model_config
    except ConfigError as err:
        raise UserError(str(err)) from None
    if run.train.seq_len > model.max_position_embeddings:
        raise UserError(f"train.seq_len ({run.train.seq_len}) exceeds model.max_position_embeddings "
                        f"({model.max_position_embeddings})")
    if run.run_dir is None:
        run = dataclasses.replace(run, run_dir=str(pathlib.Path("runs") / pathlib.Path(name).stem))
    return run
