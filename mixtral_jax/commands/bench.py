"""`mixtral-jax bench NAME`: speed benchmarks that print one JSON object each."""

from __future__ import annotations

import importlib
import json
import os

BENCHES = {
    "moe": ("mixtral_jax.benchmarks.moe", "fast MoE vs dense FFN of equal active FLOPs (+ expert-parallel)"),
    "compile": ("mixtral_jax.benchmarks.compile", "compile time at 2 vs 32 scanned layers"),
    "train": ("mixtral_jax.train.bench", "training tokens/s and MFU vs transformers"),
    "decode": ("mixtral_jax.infer.bench", "prefill/decode tokens/s vs transformers generate"),
    "batch": ("mixtral_jax.infer.batch_bench", "batch-job tokens/s: continuous batching vs batch by batch"),
}


def add_arguments(parser):
    """Adds `mixtral-jax bench`'s options to `parser`."""
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, (module, help_text) in BENCHES.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text,
                                                                     description=help_text))


def machine() -> dict:
    """What a benchmark ran on, for its JSON: figures move with the CPU generation and the
    backend (the decode path even picks its matmul forms by CPU, see `layers.SKINNY_ROWS`)."""
    import jax

    from mixtral_jax.cpuinfo import cpu_description, read_cpuinfo
    from mixtral_jax.layers import SKINNY_ROWS

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # (not on macOS)
    return {**cpu_description(read_cpuinfo()), "cores": cores,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__, "skinny_rows": list(SKINNY_ROWS)}


def run(args):
    """Runs `mixtral-jax bench` with the parsed `args`: its result, with `machine()` under
    "machine", as JSON on stdout."""
    result = importlib.import_module(BENCHES[args.bench][0]).run(args)
    print(json.dumps({**result, "machine": machine()}, indent=2))
