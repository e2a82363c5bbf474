"""`mixtral-jax bench train`: training tokens/s and MFU, against transformers' PyTorch Mixtral.

Both sides train the same config in float32 with AdamW and gradient clipping
on random token batches (the step cost does not depend on the data), the aux
loss on (transformers: `output_router_logits=True`). The JAX side is the
project's own jitted `train.step.make_train_step`. They alternate in blocks of
steps, so a load change on a shared machine hits both; step times are medians.
MFU counts the model's training FLOPs (active experts only) against the fp32
matmul rate JAX reaches on this machine, measured in the same run.
`peak_rss_mb` is the process's peak resident memory once the JAX steps have
run, before the transformers model exists.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from mixtral_jax.configtools import UserError

RESULT_KEYS = (
    "config", "batch_size", "seq_len", "moe_impl", "tokens_per_sec", "step_time_median_s", "mfu",
    "train_flops_per_token", "matmul_flops_per_sec", "peak_rss_mb", "final_loss",
    "torch_tokens_per_sec", "torch_step_time_median_s", "torch_mfu", "torch_experts_implementation",
    "speedup_vs_torch", "goals", "meets_goals",
)
GOALS = {"speedup_vs_torch": 1.2, "mfu": 0.70}


def add_arguments(parser):
    from mixtral_jax.cli import add_config_arguments

    add_config_arguments(parser, default="bench-tiny")
    parser.add_argument("--torch-steps", type=int, default=None,
                        help="timed transformers steps (default: train.steps; 0 skips the comparison)")
    parser.add_argument("--blocks", type=int, default=3,
                        help="JAX and torch alternate in this many blocks of steps")
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n fp32 matmul rate")


def run(args) -> dict:
    from mixtral_jax.allocator import reuse_freed_memory
    from mixtral_jax.train.config import load_run_config

    reuse_freed_memory()  # as `mixtral-jax train` does; process-wide, so transformers' steps run with it too

    if (args.torch_steps or 0) < 0 or args.blocks < 1 or args.matmul_size < 1:
        raise UserError("--torch-steps must be >= 0, --blocks and --matmul-size positive")
    return measure(load_run_config(args.config, args.overrides), name=args.config,
                   torch_steps=args.torch_steps, blocks=args.blocks, matmul_size=args.matmul_size)


def _jax_trainer(run_cfg, batches):
    """step() -> seconds of one blocked JAX train step over the next batch; loss() -> the last loss."""
    import jax
    from flax import nnx

    import mixtral_jax
    from mixtral_jax.checkpoint import param_tree
    from mixtral_jax.train.step import init_state, make_optimizer, make_train_step

    model = mixtral_jax.init(run_cfg.model_config, seed=run_cfg.train.seed)
    graphdef = nnx.split(model)[0]
    optimizer = make_optimizer(run_cfg.train)
    make_state = jax.jit(lambda p: init_state(p, optimizer, run_cfg.train.seed), donate_argnums=0)
    holder = {"state": make_state(param_tree(model))}  # the model's arrays move into the state
    del model
    train_step = make_train_step(graphdef, optimizer, run_cfg.train)
    device_batches = [jax.device_put(b) for b in batches]
    count = iter(range(1 << 62))

    def step() -> float:
        batch = device_batches[next(count) % len(device_batches)]
        start = time.perf_counter()
        holder["state"], metrics = train_step(holder["state"], batch)
        holder["loss"] = float(metrics["loss"])  # blocks until the step is done
        return time.perf_counter() - start

    return step, lambda: holder["loss"]


def _torch_trainer(run_cfg, batches):
    """(step() -> seconds of one transformers MixtralForCausalLM AdamW step, experts implementation)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config, train = run_cfg.model_config, run_cfg.train
    torch.manual_seed(train.seed)
    hf_config = MixtralConfig(**{**config.to_hf_config(), "output_router_logits": True})
    model = MixtralForCausalLM(hf_config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.b1, train.b2),
                                  eps=train.eps, weight_decay=train.weight_decay)
    inputs = [torch.from_numpy(b["inputs"]).long() for b in batches]
    count = iter(range(1 << 62))

    def step() -> float:
        tokens = inputs[next(count) % len(inputs)]
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, output_router_logits=True).loss  # includes aux
        loss.backward()
        if train.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, getattr(model.config, "_experts_implementation", None)


def random_batches(vocab_size: int, batch_size: int, seq_len: int, count: int = 2, seed: int = 0):
    """Loader-shaped batches of uniform random tokens (one document per row)."""
    rng = np.random.default_rng(seed)
    ones = np.ones((batch_size, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()
    batches = []
    for _ in range(count):
        tokens = rng.integers(3, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
        batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
                        "segment_ids": ones, "loss_mask": ones.astype(np.float32)})
    return batches


def measure(run_cfg, *, name: str | None = None, torch_steps: int | None = None, blocks: int = 3,
            warmup: int = 2, matmul_size: int = 4096) -> dict:
    """Times `run_cfg.train.steps` JAX steps (and `torch_steps` transformers steps, default the
    same; 0 skips them) after `warmup` untimed ones; returns the RESULT_KEYS dict.

    Each block times some JAX steps, some torch steps and the matmul rate; the
    speedup and MFU are medians of the per-block ratios, so a load change on a
    shared machine between blocks does not skew them.
    """
    from mixtral_jax.benchmarks.timing import matmul_flops_per_second

    config, train = run_cfg.model_config, run_cfg.train
    batches = random_batches(config.vocab_size, train.batch_size, train.seq_len, seed=train.seed)
    torch_steps = train.steps if torch_steps is None else torch_steps
    jax_step, last_loss = _jax_trainer(run_cfg, batches)
    for _ in range(warmup):
        jax_step()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    torch_step, torch_impl = _torch_trainer(run_cfg, batches) if torch_steps else (None, None)
    for _ in range(warmup if torch_step else 0):
        torch_step()

    blocks = max(1, min(blocks, train.steps))
    jax_times, torch_times, per_block = [], [], []
    for block in range(blocks):
        jax_block = [jax_step() for _ in range(_share(train.steps, blocks, block))]
        torch_block = [torch_step() for _ in range(_share(torch_steps, blocks, block))]
        rate = matmul_flops_per_second(matmul_size, config.dtype, repeats=3, precision=config.matmul_precision)
        jax_times += jax_block
        torch_times += torch_block
        per_block.append((statistics.median(jax_block), statistics.median(torch_block) if torch_block else None,
                          rate))

    tokens = train.batch_size * train.seq_len
    flops_per_token = config.flops_per_token(train.seq_len)
    jax_median = statistics.median(jax_times)
    torch_median = statistics.median(torch_times) if torch_times else None
    mfu = lambda seconds, rate: tokens * flops_per_token / seconds / rate
    result = {
        "config": name, "batch_size": train.batch_size, "seq_len": train.seq_len, "moe_impl": config.moe_impl,
        "tokens_per_sec": tokens / jax_median,
        "step_time_median_s": jax_median,
        "mfu": statistics.median(mfu(j, rate) for j, _, rate in per_block),
        "train_flops_per_token": flops_per_token,
        "matmul_flops_per_sec": statistics.median(rate for *_, rate in per_block),
        "peak_rss_mb": peak_rss_mb,
        "final_loss": last_loss(),
        "torch_tokens_per_sec": tokens / torch_median if torch_median else None,
        "torch_step_time_median_s": torch_median,
        "torch_mfu": statistics.median(mfu(t, rate) for _, t, rate in per_block) if torch_median else None,
        "torch_experts_implementation": torch_impl,
        "speedup_vs_torch": statistics.median(t / j for j, t, _ in per_block) if torch_median else None,
        "goals": GOALS,
    }
    result["meets_goals"] = {k: None if result[k] is None else result[k] >= goal for k, goal in GOALS.items()}
    return result


def _share(total: int, blocks: int, block: int) -> int:
    """Block `block`'s part of `total` steps split as evenly as possible."""
    return total // blocks + (block < total % blocks)
