"""`mixtral-jax plan`: compile a training step (and a decode step) for a mesh of simulated
devices ahead of time and print per-device memory as JSON.

    mixtral-jax plan --preset mixtral-8x7b --devices 64 mesh.fsdp=8 mesh.expert=8

Overrides are dotted: mesh.* (data, fsdp, expert, tensor), model.* (any model field,
e.g. model.dtype=bfloat16 model.remat=full) and train.* (batch_size, seq_len, grad_accum...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SECTIONS = ("mesh", "model", "train")


DEFAULT_SEQ_LEN = 4096  # without --seq-len: this, or the model's context if shorter


def add_arguments(parser):
    """Adds `mixtral-jax plan`'s options to `parser`."""
    parser.add_argument("--preset", default="mixtral-8x7b", help="model preset name")
    parser.add_argument("--devices", type=int, default=8, help="simulated devices in the mesh")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global sequences per step (default: one per data x fsdp x expert shard)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="training sequence length (default: the model's context, at most 4096)")
    parser.add_argument("--decode-batch", type=int, default=None,
                        help="rows of the decode step (default: one per batch shard; 0 skips it)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="mesh.*, model.* and train.* overrides, e.g. mesh.expert=8")


def _argv(args) -> list[str]:
    argv = ["plan", "--preset", args.preset, "--devices", str(args.devices)]
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size),
                        ("--decode-batch", args.decode_batch)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + list(args.overrides)


def _simulate_devices(count: int) -> bool:
    """Makes JAX see `count` CPU devices; False if its backend already started with others."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    return jax.default_backend() == "cpu" and jax.device_count() == count


def run(args):
    """Runs `mixtral-jax plan` with the parsed `args`."""
    from mixtral_jax.configtools import UserError, build, parse_overrides, require_positive

    require_positive({"--devices": args.devices})
    overrides = parse_overrides(args.overrides)
    unknown = sorted(set(overrides) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown override section {unknown[0]!r}; use mesh.*, model.* or train.*")
    if not _simulate_devices(args.devices):  # this process already has other devices: start afresh
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(args.devices)}
        return subprocess.run([sys.executable, "-m", "mixtral_jax.cli", *_argv(args)], env=env).returncode

    from mixtral_jax import sharding
    from mixtral_jax.config import from_section
    from mixtral_jax.train.plan import plan
    from mixtral_jax.train.config import TrainConfig

    config = from_section({"preset": args.preset, **overrides.get("model", {})})
    mesh = sharding.make_mesh(build(sharding.MeshConfig, overrides.get("mesh"), "mesh"))
    shards = sharding.batch_devices(mesh)
    seq_len = min(DEFAULT_SEQ_LEN, config.max_position_embeddings) if args.seq_len is None else args.seq_len
    train_cfg = build(TrainConfig, {"batch_size": args.batch_size or shards, "seq_len": seq_len,
                                    **overrides.get("train", {})}, "train")
    if train_cfg.seq_len > config.max_position_embeddings:
        raise UserError(f"seq_len ({train_cfg.seq_len}) exceeds model.max_position_embeddings "
                        f"({config.max_position_embeddings})")
    decode_batch = shards if args.decode_batch is None else args.decode_batch
    report = {"preset": args.preset, "devices": args.devices, "mesh": dict(mesh.shape),
              "batch_size": train_cfg.batch_size, "seq_len": train_cfg.seq_len,
              "grad_accum": train_cfg.grad_accum, "param_dtype": config.param_dtype,
              "dtype": config.dtype, "remat": config.remat, "decode_batch": decode_batch,
              "decode_context": train_cfg.seq_len,
              **plan(config, mesh, train_cfg, decode_batch, train_cfg.seq_len)}
    print(json.dumps(report, indent=2))
