"""`mixtral-jax bench decode`: prefill and decode speed, against transformers and the memory bound.

For each bench preset and batch size: compile time (first call minus a warm
one), time to first token (the prefill program, which samples the first
token), prefill tokens/s, decode tokens/s (the while_loop program), and the
same prompts through transformers' `generate` (PyTorch CPU, KV cache, greedy,
the same random config). transformers' decode rate is its generate time for
all the new tokens less its time for one (the prefill and first token), so
`speedup_vs_torch` (goal >= 3) compares decode with decode;
`end_to_end_speedup_vs_torch` compares whole generate calls.

At batch 1 decode reads every active weight once per token: the bound is
(bytes of active weights + the KV cache of the average context) / the read
bandwidth JAX reaches summing a large array; `bound_ratio` is the bound's
tokens/s over the measured ones (goal <= 2).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.benchmarks.timing import median_seconds

GOALS = {"speedup_vs_torch": 3.0, "bound_ratio": 2.0}


def add_arguments(parser):
    parser.add_argument("--presets", default="bench-tiny,bench-small", help="comma-separated presets")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second JAX reads summing a large float32 array."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    return x.nbytes / median_seconds(jax.jit(jnp.sum), x, repeats=repeats)


def bytes_per_token(config, context: float) -> float:
    """Bytes decode reads for one token of one row: active weights (one embedding row) + its KV cache."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    weights = config.num_active_params - (config.vocab_size - 1) * config.hidden_size
    cache = 2 * config.num_hidden_layers * config.kv_dim * context * jnp.dtype(config.dtype).itemsize
    return weights * itemsize + cache


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of the next `repeats`), each blocked until ready."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def measure_jax(model, prompts: np.ndarray, new_tokens: int, repeats: int) -> dict:
    """Compile time, time to first token, prefill and decode tokens/s of greedy generation."""
    from mixtral_jax.infer.generate import Generator, Request

    generator = Generator(model, eos_ids=[-1])  # no EOS: every row runs to new_tokens
    batch = generator.prepare([Request(p.tolist(), new_tokens) for p in prompts])
    rows, prompt_len = prompts.shape
    first_prefill, prefill_s = _timed(lambda: generator.prefill(batch), repeats)
    first_decode, decode_s = _timed(lambda: generator.decode(generator.prefill(batch), batch, new_tokens),
                                    repeats)
    decode_s -= prefill_s  # the decode timing includes a fresh prefill (the state is donated)
    state = generator.decode(generator.prefill(batch), batch, new_tokens)
    assert int(jnp.min(state.length[:rows])) == new_tokens
    return {
        "compile_s": round(first_prefill - prefill_s + first_decode - decode_s - prefill_s, 3),
        "time_to_first_token_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(rows * prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(rows * (new_tokens - 1) / decode_s, 1),
        "end_to_end_tokens_per_s": round(rows * new_tokens / (prefill_s + decode_s), 1),
    }


def measure_torch(config, prompts: np.ndarray, new_tokens: int, repeats: int) -> dict:
    """transformers' generate (KV cache, greedy) on a random model of the same config:
    decode and end-to-end tokens/s."""
    import torch
    import transformers

    hf_config = transformers.MixtralConfig(**config.to_hf_config())
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(hf_config).eval()
    ids = torch.as_tensor(prompts, dtype=torch.long)

    def run(count):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                                  min_new_tokens=count, do_sample=False, use_cache=True, pad_token_id=0)

    _, seconds = _timed(lambda: run(new_tokens), max(1, repeats - 1))
    _, first_token_s = _timed(lambda: run(1), max(1, repeats - 1))
    rows = prompts.shape[0]
    return {"time_to_first_token_s": round(first_token_s, 4),
            "decode_tokens_per_s": round(rows * (new_tokens - 1) / (seconds - first_token_s), 1),
            "end_to_end_tokens_per_s": round(rows * new_tokens / seconds, 1)}


def run(args) -> dict:
    from mixtral_jax.config import preset
    from mixtral_jax.model import init

    bandwidth = read_bandwidth()
    report = {"backend": jax.default_backend(), "devices": jax.device_count(),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 2), "goals": GOALS, "results": []}
    rng = np.random.default_rng(0)
    for name in args.presets.split(","):
        config = preset(name)
        model = init(config, seed=0)
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len))
            entry = {"preset": name, "batch": batch, "jax": measure_jax(model, prompts, args.new_tokens,
                                                                        args.repeats)}
            if not args.no_torch:
                entry["torch"] = measure_torch(config, prompts, args.new_tokens, args.repeats)
                ratio = lambda key: round(entry["jax"][key] / entry["torch"][key], 2)
                entry["speedup_vs_torch"] = ratio("decode_tokens_per_s")
                entry["end_to_end_speedup_vs_torch"] = ratio("end_to_end_tokens_per_s")
            if batch == 1:
                context = args.prompt_len + args.new_tokens / 2
                bound = bandwidth / bytes_per_token(config, context)
                entry["bandwidth_bound_tokens_per_s"] = round(bound, 1)
                entry["bound_ratio"] = round(bound / entry["jax"]["decode_tokens_per_s"], 2)
            report["results"].append(entry)
    return report
