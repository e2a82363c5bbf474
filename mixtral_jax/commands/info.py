"""`mixtral-jax info`: parameter counts and FLOPs per token of a model."""

from __future__ import annotations

import json


def add_arguments(parser):
    """Adds `mixtral-jax info`'s options to `parser`."""
    parser.add_argument("--preset", default="mixtral-8x7b", help="model preset name")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length for attention FLOPs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="model field overrides, e.g. num_hidden_layers=4 (or model.num_hidden_layers=4)")


def run(args):
    """Runs `mixtral-jax info` with the parsed `args`."""
    from mixtral_jax.config import from_section
    from mixtral_jax.configtools import parse_overrides, require_positive

    require_positive({"--seq-len": args.seq_len})
    overrides = parse_overrides(args.overrides)
    if isinstance(overrides.get("model"), dict):  # model.x=..., as `train` and `plan` take it
        overrides = {**overrides.pop("model"), **overrides}
    config = from_section({"preset": args.preset, **overrides})
    report = {
        "preset": args.preset,
        "total_params": config.num_params,
        "active_params_per_token": config.num_active_params,
        "train_flops_per_token": config.flops_per_token(args.seq_len, training=True),
        "forward_flops_per_token": config.flops_per_token(args.seq_len, training=False),
        "seq_len": args.seq_len,
        "bytes_bf16": 2 * config.num_params,
        "config": config.to_dict(),
    }
    print(f"{args.preset}: {config.num_params / 1e9:.1f}B parameters, "
          f"{config.num_active_params / 1e9:.1f}B active per token "
          f"({config.num_params:,} / {config.num_active_params:,})")
    print(json.dumps(report, indent=2))
