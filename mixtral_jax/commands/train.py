"""`mixtral-jax train`: pretrain or continue training from a run config."""

from __future__ import annotations


def add_arguments(parser):
    """Adds `mixtral-jax train`'s options to `parser`."""
    from mixtral_jax.cli import add_config_arguments

    add_config_arguments(parser)
    parser.epilog = ("With no --config, trains the default small Mixtral (configs/default.yaml) on "
                     "CPython's bundled documentation. Rerunning a command resumes its run_dir.")


def run(args):
    """Runs `mixtral-jax train` with the parsed `args`."""
    from mixtral_jax.allocator import reuse_freed_memory
    from mixtral_jax.train.config import load_run_config
    from mixtral_jax.train.main import train

    reuse_freed_memory()  # before JAX allocates: on CPU the default run is 1.25x faster (README)
    summary = train(load_run_config(args.config, args.overrides))
    if "sample" in summary:
        print(f"\nsample: {summary['sample']}")
    if "plot" in summary:
        print(f"plot: {summary['plot']}")
    return summary.get("exit_code", 0)
