"""Inference: generation with a KV cache, sampling, batch jobs and eval.

    from mixtral_jax.infer import generate
    results = generate(model, ["Once upon a time"], tokenizer, max_new_tokens=64, temperature=0.8)

Modules: `sampling` (strategies), `decode` (the prefill and while_loop decode
programs), `generate` (prompts -> completions, bucketing, stop strings,
streaming), `batch` (resumable JSONL jobs), `evaluate` (perplexity),
`runtime` (CLI settings, compilation cache, model loading), `bench` (decode),
`batch_bench` (continuous batching against batch by batch).
"""

from mixtral_jax.infer.generate import Completion, Generator, Request, generate
from mixtral_jax.infer.sampling import Categorical, Greedy, Temperature, TopK, TopP, make_sampler

__all__ = ["Categorical", "Completion", "Generator", "Greedy", "Request", "Temperature", "TopK", "TopP",
           "generate", "make_sampler"]
