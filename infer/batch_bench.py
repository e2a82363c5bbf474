"""`mixtral-jax bench batch`: a batch job's tokens/s when its rows end at different lengths.

Continuous batching (`Generator.run_continuous`, what `mixtral-jax batch`
runs: a finished row takes the next request) against the same rows run batch
by batch (`Generator.run` on consecutive slices of `--batch-size` rows, each
slice lasting as long as its longest row). A random model rarely emits its
EOS, so each row asks for its own max_new_tokens, drawn uniformly from
1..--max-new-tokens: the spread of lengths that EOS and stop strings give a
real job. Rows are greedy and both ways must give every row its count of
tokens (checked first, which also compiles both; the tokens themselves may
round differently, see `Generator.run_continuous`). The two alternate in
rounds; times are medians, `speedup` the median of the per-round ratios.
"""

from __future__ import annotations

import statistics

import numpy as np

from mixtral_jax.benchmarks.timing import alternating_seconds, median_ratio
from mixtral_jax.configtools import require_positive


def add_arguments(parser):
    """Adds `mixtral-jax bench batch`'s options to `parser`."""
    parser.add_argument("--preset", default="bench-tiny")
    parser.add_argument("--rows", type=int, default=128, help="requests in the job")
    parser.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="each row asks for 1 to this many")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each way, alternating (median)")


def run(args) -> dict:
    """The result of `mixtral-jax bench batch` for the parsed `args` (the CLI prints it as JSON)."""
    from mixtral_jax.config import preset
    from mixtral_jax.infer.generate import Generator, Request
    from mixtral_jax.model import init

    require_positive({"--rows": args.rows, "--batch-size": args.batch_size, "--prompt-len": args.prompt_len,
                      "--max-new-tokens": args.max_new_tokens, "--repeats": args.repeats})
    config = preset(args.preset)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, args.max_new_tokens + 1, args.rows)
    requests = [Request(rng.integers(3, config.vocab_size, args.prompt_len).tolist(), int(n)) for n in lengths]
    generator = Generator(init(config, seed=0), eos_ids=[-1])  # every row runs to its max_new_tokens
    size = args.batch_size

    def batch_by_batch() -> list:
        return [c for first in range(0, len(requests), size) for c in generator.run(requests[first:first + size])]

    def continuous() -> list:
        done = dict(pair for finished in generator.run_continuous(requests, size) for pair in finished)
        return [done[index] for index in range(len(requests))]

    if [len(c.tokens) for c in batch_by_batch()] != [len(c.tokens) for c in continuous()]:
        raise RuntimeError("continuous batching gave other token counts than batch by batch")
    times = alternating_seconds({"batch_by_batch": lambda: len(batch_by_batch()),
                                 "continuous": lambda: len(continuous())}, warmup=0, repeats=args.repeats)
    tokens = int(lengths.sum())
    ways = {name: {"seconds": round(statistics.median(seconds), 4),
                   "tokens_per_s": round(tokens / statistics.median(seconds), 1)}
            for name, seconds in times.items()}
    return {"preset": args.preset, "rows": args.rows, "batch_size": size, "prompt_len": args.prompt_len,
            "new_tokens": {"total": tokens, "min": int(lengths.min()), "median": float(np.median(lengths)),
                           "max": int(lengths.max())},
            **ways, "speedup": round(median_ratio(times["batch_by_batch"], times["continuous"]), 2)}
