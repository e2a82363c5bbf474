"""What the inference commands share: their settings, the compilation cache,
and loading a model (any checkpoint the project writes, onto an optional mesh).

Settings are trailing `key=value` words (or a YAML file of the same keys):
    temperature=0.7 top_p=0.9 max_new_tokens=128 stop='["\\n\\n"]'
    mesh.expert=8 model.dtype=bfloat16 compile_cache=/path (or compile_cache='' to turn it off)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from mixtral_jax.configtools import UserError, build, load
from mixtral_jax.sharding.config import DistributedConfig, MeshConfig

COMPILE_CACHE_ENV = "MIXTRAL_JAX_COMPILE_CACHE"


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """Settings of `generate`, `batch` and `eval` (rows of a batch job may override sampling)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    batch_size: int = 16  # rows per compiled batch (batch, eval)
    seq_len: int | None = None  # eval: tokens per scored window (None: the model's context, at most 2048)
    tokenizer: str | None = None  # default: the model config's; "bytes" for byte-level test models
    compile_cache: str | None = None  # None: the user cache dir (or $MIXTRAL_JAX_COMPILE_CACHE); "": off
    mesh: MeshConfig | None = None  # None: one device
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    model: dict = dataclasses.field(default_factory=dict)  # config changes, e.g. dtype, moe_impl


def add_arguments(parser) -> None:
    """--checkpoint, --config and trailing key=value settings."""
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory, its checkpoints/ folder, one step, or a Hugging Face directory")
    parser.add_argument("--config", default=None, help="YAML file of settings (the keys below)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings: max_new_tokens, temperature, top_k, top_p, seed, stop, batch_size, "
                             "seq_len, tokenizer, compile_cache, mesh.*, distributed.*, model.*")
    parser.set_defaults(settings="mixtral_jax.infer.runtime:InferenceConfig")


def read_config(args) -> InferenceConfig:
    """The command's settings, checked."""
    config = build(InferenceConfig, load(args.config, args.overrides))
    for name, value, least in (("batch_size", config.batch_size, 1), ("seq_len", config.seq_len, 2),
                               ("max_new_tokens", config.max_new_tokens, 0)):
        if value is not None and value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    return config


def enable_compile_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its folder (None when off).

    Default folder: $MIXTRAL_JAX_COMPILE_CACHE, else ~/.cache/mixtral-jax/jax (XDG_CACHE_HOME honoured).
    """
    import jax

    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
        directory = os.environ.get(COMPILE_CACHE_ENV, str(pathlib.Path(base) / "mixtral-jax" / "jax"))
    if not directory:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return str(directory)


def setup(config: InferenceConfig, local_mesh: bool = False):
    """Compilation cache, multi-host start-up and the mesh (None for one device).

    `local_mesh`: the mesh spans this process's devices only (batch jobs: each
    process runs its own shard of rows with its own replica).
    """
    import jax

    from mixtral_jax import sharding

    enable_compile_cache(config.compile_cache)
    sharding.initialize_distributed(config.distributed)
    if config.mesh is None:
        return None
    return sharding.make_mesh(config.mesh, jax.local_devices() if local_mesh else None)


def load_model(path: str, mesh=None, **config_changes):
    """The model at `path` (mixtral-jax checkpoint or Hugging Face directory), sharded onto `mesh`."""
    from mixtral_jax import sharding
    from mixtral_jax.hf import HF_CONFIG
    from mixtral_jax.loading import load as load_any

    try:
        if mesh is not None and not (pathlib.Path(path) / HF_CONFIG).is_file():
            return sharding.restore_model(path, mesh, **config_changes)  # checks the mesh first
        model = load_any(path, **config_changes)
    except TypeError as err:  # an unknown model.* key
        raise UserError(f"model settings: {err}") from None
    if mesh is None:
        return model
    sharding.check_divisible(mesh, model.config)  # before placing: an uneven split is one clear error
    return _place(model, mesh)


def _place(model, mesh):
    """A single-device model's parameters moved onto the mesh's parameter shardings."""
    import jax
    from flax import nnx

    from mixtral_jax import sharding

    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(state, sharding.param_shardings(state, mesh)))
    return model


def open_checkpoint(args, local_mesh: bool = False):
    """(settings, mesh, model, tokenizer) for an inference command's `args`: `read_config`,
    `setup`, `load_model` of --checkpoint, and the tokenizer the settings or the model name."""
    from mixtral_jax.tokenizer import load_tokenizer

    config = read_config(args)
    mesh = setup(config, local_mesh)
    model = load_model(args.checkpoint, mesh, **config.model)
    return config, mesh, model, load_tokenizer(model.config, config.tokenizer)
