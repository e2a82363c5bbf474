"""`mixtral-jax eval`: perplexity over a text or JSONL file, and per-document log-likelihoods.

    mixtral-jax eval --checkpoint runs/demo --data valid.jsonl --output scores.jsonl seq_len=1024
"""

from __future__ import annotations

import json

DEFAULT_WINDOW = 2048  # tokens per scored window when seq_len is not set and the context allows


def add_arguments(parser):
    """Adds `mixtral-jax eval`'s options to `parser`."""
    from mixtral_jax.infer import runtime

    runtime.add_arguments(parser)
    parser.add_argument("--data", required=True, help="a UTF-8 text file (one document) or JSONL (one per line)")
    parser.add_argument("--text-field", default="text", help="the JSONL key holding the text")
    parser.add_argument("--output", default=None,
                        help="write one JSON record per document here (missing folders are created)")


def run(args):
    """Runs `mixtral-jax eval` with the parsed `args`."""
    from mixtral_jax.documents import check_output_file
    from mixtral_jax.infer import runtime
    from mixtral_jax.infer.evaluate import evaluate

    # checked before scoring: a bad path found afterwards would lose the scores
    output = check_output_file(args.output, "--output") if args.output else None
    config, mesh, model, tokenizer = runtime.open_checkpoint(args)
    seq_len = config.seq_len or min(DEFAULT_WINDOW, model.config.max_position_embeddings)
    summary, records = evaluate(model, tokenizer, args.data, seq_len=seq_len,
                                batch_size=config.batch_size, text_field=args.text_field, mesh=mesh,
                                progress=True)
    if output:
        with output.open("w") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)
    print(json.dumps(summary))
