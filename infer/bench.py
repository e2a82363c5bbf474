"""`mixtral-jax bench decode`: prefill and decode speed, against transformers and the memory bound.

For each bench preset and batch size: compile time (first call minus a warm
one), time to first token (the prefill program, which samples the first
token), prefill tokens/s, decode tokens/s (the while_loop program), and the
same prompts through transformers' `generate` (PyTorch CPU, KV cache, greedy,
the same random config), in a process of its own with glibc's malloc
defaults, as its users run it (`benchmarks.spawned`: sharing this process,
it got the huge pages the CLI restarts with). transformers' decode rate is
its generate time for all the new tokens less its time for one (the prefill
and first token), so `speedup_vs_torch` (goal >= 3) compares decode with decode;
`end_to_end_speedup_vs_torch` compares whole generate calls. The two sides
alternate in rounds; times are medians and speedups medians of the per-round
ratios, so a load change on a shared machine hits both.

A decode step reads every weight it uses once: the dense ones, the
experts its rows route to (at batch B, E * (1 - (1 - k/E)^B) per layer under
uniform routing: the top-k at batch 1, nearly all E at batch 32), and each
row's embedding and the KV cache of the average context. The bound is B
tokens per the time those bytes take at the read bandwidth JAX reaches
summing a large array; `bound_ratio` is the bound's tokens/s over the
measured ones, at every batch. Its goal (<= 2) is for batch 1; at larger
batches the matmuls' FLOPs count too, so there the ratio only says how far
decode is from the memory.

`native_experts` says whether the experts ran on the native kernel
(`mixtral_jax.native`; MIXTRAL_JAX_NATIVE=0 times XLA's matmuls instead).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import native
from mixtral_jax.allocator import on_huge_pages
from mixtral_jax.benchmarks.spawned import Spawned
from mixtral_jax.benchmarks.timing import median_seconds
from mixtral_jax.configtools import UserError, require_positive

GOALS = {"speedup_vs_torch": 3.0, "bound_ratio_at_batch_1": 2.0}


def add_arguments(parser):
    """Adds `mixtral-jax bench decode`'s options to `parser`."""
    parser.add_argument("--presets", default="bench-tiny,bench-small", help="comma-separated presets")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each side, alternating (median)")
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(size) for size in text.split(",")]
    except ValueError:
        raise UserError(f"--batches takes comma-separated integers, got {text!r}") from None


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second JAX reads summing a large float32 array."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    return x.nbytes / median_seconds(jax.jit(jnp.sum), x, repeats=repeats)


def bytes_per_step(config, batch: int, context: float) -> float:
    """Bytes a decode step of `batch` rows reads: the dense weights once, the experts its rows
    route to (expected distinct experts under uniform top-k routing), and per row one embedding
    row and the KV cache of `context` tokens."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    layers, experts, d = config.num_hidden_layers, config.num_local_experts, config.hidden_size
    expert_params = 3 * d * config.intermediate_size
    dense = config.num_params - config.vocab_size * d - layers * experts * expert_params
    routed = experts * (1 - (1 - config.num_experts_per_tok / experts) ** batch)  # per layer
    cache = 2 * layers * config.kv_dim * context * jnp.dtype(config.dtype).itemsize
    return (dense + layers * routed * expert_params + batch * d) * itemsize + batch * cache


def _timed(fn):
    """(wall seconds, result) of one call of `fn`, blocked until its result is ready."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return time.perf_counter() - start, result


class JaxGeneration:
    """Greedy generation of `prompts` [B, T] by the project's Generator, `new_tokens` per row.

    Construction compiles both programs (`compile_s`); each `round()` then
    times one prefill and one decode loop over its state.
    """

    def __init__(self, model, prompts: np.ndarray, new_tokens: int):
        from mixtral_jax.infer.generate import Generator, Request

        self.generator = generator = Generator(model, eos_ids=[-1])  # no EOS: every row runs to new_tokens
        self.batch = generator.prepare([Request(p.tolist(), new_tokens) for p in prompts])
        self.new_tokens = new_tokens
        *first, state = self._run()
        assert int(jnp.min(state.length[:len(prompts)])) == new_tokens
        self.compile_s = sum(first) - sum(self.round())

    def _run(self):
        """(prefill seconds, decode seconds, the final DecodeState)."""
        prefill_s, state = _timed(lambda: self.generator.prefill(self.batch))
        decode_s, state = _timed(lambda: self.generator.decode(state, self.batch, self.new_tokens))  # donates state
        return prefill_s, decode_s, state

    def round(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds): a timed prefill, then the decode loop over its state."""
        return self._run()[:2]


class TorchGeneration:
    """transformers' generate (KV cache, greedy) on a random model of the same config."""

    def __init__(self, config, prompts: np.ndarray, new_tokens: int):
        import torch
        import transformers

        hf_config = transformers.MixtralConfig(**config.to_hf_config())
        torch.manual_seed(0)
        self.model = transformers.MixtralForCausalLM(hf_config).eval()
        self.ids = torch.as_tensor(prompts, dtype=torch.long)
        self.new_tokens = new_tokens
        self._generate(1)  # warm up

    def _generate(self, count: int):
        import torch

        with torch.no_grad():
            return self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=count,
                                       min_new_tokens=count, do_sample=False, use_cache=True, pad_token_id=0)

    def round(self) -> tuple[float, float]:
        """(seconds to the first token, seconds of the rest): generate 1 token (the faster of two
        calls: one slowed call made the rest negative on tiny models), and all less that."""
        first_s = min(_timed(lambda: self._generate(1))[0] for _ in range(2))
        return first_s, _timed(lambda: self._generate(self.new_tokens))[0] - first_s


def measure(config, model, prompts: np.ndarray, new_tokens: int, repeats: int, torch: bool) -> dict:
    """One (preset, batch) entry: JAX and, with `torch`, transformers timed in alternating rounds;
    times are medians, speedups medians of the per-round ratios (a load change on a shared
    machine between rounds hits both sides)."""
    rows, prompt_len = prompts.shape
    decoded = rows * (new_tokens - 1)
    torch_side = Spawned(TorchGeneration, config, prompts, new_tokens, label="transformers'") if torch else None
    try:
        jax_side = JaxGeneration(model, prompts, new_tokens)  # compiles while transformers builds
        if torch_side:
            torch_side.wait_ready()
        rounds = [(jax_side.round(), torch_side.call("round") if torch_side else None) for _ in range(repeats)]
    finally:
        if torch_side:
            torch_side.close()
    prefill_s = statistics.median(j[0] for j, _ in rounds)
    decode_s = statistics.median(j[1] for j, _ in rounds)
    entry = {"jax": {
        "compile_s": round(jax_side.compile_s, 3),
        "time_to_first_token_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(rows * prompt_len / prefill_s, 1),
        "decode_tokens_per_s": round(decoded / decode_s, 1),
        "end_to_end_tokens_per_s": round(rows * new_tokens / (prefill_s + decode_s), 1),
    }}
    if torch_side:
        first_s = statistics.median(t[0] for _, t in rounds)
        rest_s = statistics.median(t[1] for _, t in rounds)
        entry["torch"] = {"time_to_first_token_s": round(first_s, 4),
                          "decode_tokens_per_s": round(decoded / rest_s, 1),
                          "end_to_end_tokens_per_s": round(rows * new_tokens / (first_s + rest_s), 1)}
        entry["speedup_vs_torch"] = round(statistics.median(t[1] / j[1] for j, t in rounds), 2)
        entry["end_to_end_speedup_vs_torch"] = round(statistics.median(sum(t) / sum(j) for j, t in rounds), 2)
    return entry


def run(args) -> dict:
    """The result of `mixtral-jax bench decode` for the parsed `args` (the CLI prints it as JSON)."""
    from mixtral_jax.config import preset
    from mixtral_jax.model import init

    batches = _batch_sizes(args.batches)
    configs = {name: preset(name) for name in args.presets.split(",")}
    require_positive({"--prompt-len": args.prompt_len, "--repeats": args.repeats, "--batches": min(batches)})
    if args.new_tokens < 2:  # decode's rate is the time for all new tokens less the time for the first
        raise UserError(f"--new-tokens must be at least 2, got {args.new_tokens}")
    bandwidth = read_bandwidth()
    report = {"backend": jax.default_backend(), "devices": jax.device_count(), "huge_pages": on_huge_pages(),
              "native_experts": native.available(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "read_bandwidth_gb_per_s": round(bandwidth / 1e9, 2), "goals": GOALS, "results": []}
    rng = np.random.default_rng(0)
    for name, config in configs.items():
        model = init(config, seed=0)
        for batch in batches:
            prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len))
            entry = {"preset": name, "batch": batch,
                     **measure(config, model, prompts, args.new_tokens, args.repeats, torch=not args.no_torch)}
            bound = batch * bandwidth / bytes_per_step(config, batch, args.prompt_len + args.new_tokens / 2)
            entry["bandwidth_bound_tokens_per_s"] = round(bound, 1)
            entry["bound_ratio"] = round(bound / entry["jax"]["decode_tokens_per_s"], 2)
            report["results"].append(entry)
    return report
