"""`mixtral-jax batch`: generate for every row of a JSONL file, resumably.

    mixtral-jax batch --checkpoint runs/demo --input prompts.jsonl --output results.jsonl temperature=0.7

See `mixtral_jax.infer.batch` for the row formats, error records, resuming and many hosts.
"""

from __future__ import annotations

import json
import pathlib


def add_arguments(parser):
    """Adds `mixtral-jax batch`'s options to `parser`."""
    from mixtral_jax.infer import runtime

    runtime.add_arguments(parser)
    parser.add_argument("--input", required=True, help="JSONL rows with id and prompt or messages")
    parser.add_argument("--output", required=True, help="JSONL results (appended; a rerun resumes)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="run again the lines whose output records are errors (they leave --output)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args):
    """Runs `mixtral-jax batch` with the parsed `args`."""
    import jax

    from mixtral_jax.configtools import UserError
    from mixtral_jax.infer import runtime
    from mixtral_jax.infer.batch import run_job
    from mixtral_jax.infer.generate import Generator

    if not pathlib.Path(args.input).expanduser().is_file():  # before the (slow) checkpoint load
        raise UserError(f"--input {args.input} is not a file")
    config, mesh, model, tokenizer = runtime.open_checkpoint(args, local_mesh=True)
    generator = Generator(model, tokenizer, mesh=mesh)
    summary = run_job(generator, args.input, args.output, config, batch_size=config.batch_size,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      progress=not args.no_progress, retry_errors=args.retry_errors)
    print(json.dumps(summary))
