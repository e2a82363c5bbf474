"""`mixtral-jax convert`: Hugging Face safetensors <-> mixtral-jax checkpoints, streamed tensor by tensor.

    mixtral-jax convert --from-hf DIR --out CKPT
    mixtral-jax convert --checkpoint CKPT --to-hf DIR [--max-shard-size 5GB]
"""

from __future__ import annotations

import re

from mixtral_jax.configtools import UserError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def add_arguments(parser):
    """Adds `mixtral-jax convert`'s options to `parser`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR",
                        help="a Hugging Face Mixtral directory (config.json + *.safetensors)")
    source.add_argument("--checkpoint", metavar="CKPT",
                        help="a mixtral-jax checkpoint: run directory, its checkpoints/ folder, or a step")
    parser.add_argument("--out", metavar="CKPT", help="with --from-hf: the run directory to write")
    parser.add_argument("--to-hf", metavar="DIR", help="with --checkpoint: the Hugging Face directory to write")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="with --to-hf: the largest safetensors file, e.g. 5GB, 500MB (default 5GB)")


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def run(args):
    """Runs `mixtral-jax convert` with the parsed `args`."""
    from mixtral_jax import hf
    from mixtral_jax.documents import check_output_folder

    if args.from_hf:
        if not args.out or args.to_hf:
            raise UserError("--from-hf DIR takes --out CKPT (and no --to-hf)")
        check_output_folder(args.out, "--out")
        step = hf.convert_from_hf(args.from_hf, args.out)
        print(f"wrote {step} (load it with mixtral_jax.load({str(args.out)!r}))")
    else:
        if not args.to_hf or args.out:
            raise UserError("--checkpoint CKPT takes --to-hf DIR (and no --out)")
        check_output_folder(args.to_hf, "--to-hf")
        files = hf.convert_to_hf(args.checkpoint, args.to_hf, max_shard_bytes=parse_size(args.max_shard_size))
        print(f"wrote {len(files)} files to {args.to_hf}: {', '.join(f.name for f in files)}")
