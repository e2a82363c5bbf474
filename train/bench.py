"""`mixtral-jax bench train`: training tokens/s and MFU, against transformers' PyTorch Mixtral.

Both sides train the same config in float32 with AdamW and gradient clipping
on random token batches (the step cost does not depend on the data), the aux
loss on (transformers: `output_router_logits=True`). The JAX side is the
project's own jitted `train.step.make_train_step`, in this process, with the
malloc settings `mixtral-jax train` makes (`allocator.reuse_freed_memory`,
and huge pages when the console script restarts itself with them:
`huge_pages` says whether it did). transformers trains in processes of its
own, as its users run it: one with glibc's defaults, the goal's baseline
(`torch_*`, `speedup_vs_torch`), and one given the same malloc settings as
ours (`torch_malloc_tuned_*`): sharing this process, it used to get them
without asking, which made its steps 1.4-1.6x faster on a Zen 4 machine.
The plain one also depends on this process's pages: beside it holding
bench-small's ~5 GB on 4 KB pages, its steps ran 1.2-1.4x slower than alone;
beside huge pages, as fast as alone (Zen 5). The three alternate in blocks
of steps, so a load change on a shared machine hits all of them; step times
are medians.
MFU counts the model's training FLOPs (active experts only) against the
matmul rate JAX reaches on this machine at the model's compute dtype and
matmul precision (fp32 for the bench configs), measured in the same run.
`peak_rss_mb` is this process's peak resident memory once the JAX steps
have run.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np

from mixtral_jax.benchmarks.spawned import Spawned
from mixtral_jax.configtools import UserError

RESULT_KEYS = (
    "config", "batch_size", "seq_len", "moe_impl", "tokens_per_sec", "step_time_median_s", "mfu",
    "train_flops_per_token", "matmul_flops_per_sec", "peak_rss_mb", "final_loss", "malloc_tuned", "huge_pages",
    "torch_tokens_per_sec", "torch_step_time_median_s", "torch_mfu", "torch_experts_implementation",
    "speedup_vs_torch", "torch_malloc_tuned_tokens_per_sec", "torch_malloc_tuned_step_time_median_s",
    "torch_malloc_tuned_mfu", "speedup_vs_torch_malloc_tuned", "goals", "meets_goals",
)
TORCH_RUNS = {"torch": False, "torch_malloc_tuned": True}  # result key prefix -> our malloc settings
GOALS = {"speedup_vs_torch": 1.2, "mfu": 0.70}


def add_arguments(parser):
    """Adds `mixtral-jax bench train`'s options to `parser`."""
    from mixtral_jax.cli import add_config_arguments

    add_config_arguments(parser, default="bench-tiny")
    parser.add_argument("--torch-steps", type=int, default=None,
                        help="timed steps of each transformers process (default: train.steps; 0 skips them)")
    parser.add_argument("--blocks", type=int, default=3,
                        help="JAX and the transformers processes alternate in this many blocks of steps")
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n matmul rate MFU is measured against")


def run(args) -> dict:
    """The result of `mixtral-jax bench train` for the parsed `args` (the CLI prints it as JSON)."""
    from mixtral_jax.allocator import reuse_freed_memory
    from mixtral_jax.train.config import load_run_config

    reuse_freed_memory()  # as `mixtral-jax train` does (the transformers processes decide for themselves)

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
    from mixtral_jax.train.step import StateLayout, init_state, make_optimizer, make_train_step

    model = mixtral_jax.init(run_cfg.model_config, seed=run_cfg.train.seed)
    graphdef = nnx.split(model)[0]
    optimizer = make_optimizer(run_cfg.train)
    make_state = jax.jit(lambda p: init_state(p, optimizer, run_cfg.train.seed), donate_argnums=0)
    layout = StateLayout(run_cfg.train, run_cfg.model_config.num_hidden_layers)  # as `mixtral-jax train` keeps it
    holder = {"state": layout.for_steps(make_state(param_tree(model)))}  # the model's arrays move into the state
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


class _TorchTrainer:
    """`_torch_trainer` warmed up by `warmup` steps, for a process of its own; `tune_malloc`: with
    `allocator.reuse_freed_memory()` first, as `mixtral-jax train` runs."""

    def __init__(self, run_cfg, batches, warmup: int, tune_malloc: bool):
        if tune_malloc:
            from mixtral_jax.allocator import reuse_freed_memory

            reuse_freed_memory()
        self._step, self._experts_implementation = _torch_trainer(run_cfg, batches)
        for _ in range(warmup):
            self._step()

    def experts_implementation(self):
        """transformers' experts implementation, as its config names it."""
        return self._experts_implementation

    def steps(self, count: int) -> list[float]:
        """Seconds of each of `count` more steps."""
        return [self._step() for _ in range(count)]


class TorchProcess(Spawned):
    """transformers' trainer in a spawned process of its own, with glibc's defaults or (with
    `tune_malloc`) the malloc settings of `mixtral-jax train`; `steps(n)` -> n step times."""

    def __init__(self, run_cfg, batches, *, warmup: int, tune_malloc: bool):
        super().__init__(_TorchTrainer, run_cfg, batches, warmup, tune_malloc, huge_pages=tune_malloc,
                         label="transformers'")
        self.experts_implementation = None

    def wait_ready(self):
        """Blocks until the model is built and warmed up."""
        super().wait_ready()
        self.experts_implementation = self.call("experts_implementation")

    def steps(self, count: int) -> list[float]:
        """Seconds of each of `count` more steps."""
        return self.call("steps", count)


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
    """Times `run_cfg.train.steps` JAX steps (and `torch_steps` steps of each transformers
    process, default the same; 0 skips them) after `warmup` untimed ones; returns the
    RESULT_KEYS dict.

    Each block times some JAX steps, some steps of each transformers process and
    the matmul rate; speedups and MFU are medians of the per-block ratios, so a
    load change on a shared machine between blocks does not skew them. The
    transformers processes are spawned: from a script of your own, call this under
    `if __name__ == "__main__":`, as multiprocessing requires, and call
    `allocator.reuse_freed_memory()` first, as the CLI does (`malloc_tuned` says
    whether it applied): without it, every bench-small step faults in ~2 GB of
    fresh pages (~3.6 s a step becomes ~4.1 s on a Zen 4 machine).
    """
    from mixtral_jax.allocator import on_huge_pages, reusing_freed_memory
    from mixtral_jax.benchmarks.timing import matmul_flops_per_second

    config, train = run_cfg.model_config, run_cfg.train
    batches = random_batches(config.vocab_size, train.batch_size, train.seq_len, seed=train.seed)
    torch_steps = train.steps if torch_steps is None else torch_steps
    torch_runs = {}
    try:
        for prefix, tuned in TORCH_RUNS.items() if torch_steps else ():
            torch_runs[prefix] = TorchProcess(run_cfg, batches, warmup=warmup, tune_malloc=tuned)
        for run in torch_runs.values():
            run.wait_ready()
        jax_step, last_loss = _jax_trainer(run_cfg, batches)
        for _ in range(warmup):
            jax_step()
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

        blocks = max(1, min(blocks, train.steps))
        times = {"jax": [], **{prefix: [] for prefix in torch_runs}}  # seconds per step
        per_block = []  # ({side: median step seconds}, matmul FLOP/s)
        for block in range(blocks):
            block_times = {"jax": [jax_step() for _ in range(_share(train.steps, blocks, block))]}
            for prefix, run in torch_runs.items():
                if count := _share(torch_steps, blocks, block):
                    block_times[prefix] = run.steps(count)
            rate = matmul_flops_per_second(matmul_size, config.dtype, repeats=3, precision=config.matmul_precision)
            for side, seconds in block_times.items():
                times[side] += seconds
            per_block.append(({side: statistics.median(seconds) for side, seconds in block_times.items()}, rate))
    finally:
        for run in torch_runs.values():
            run.close()

    tokens = train.batch_size * train.seq_len
    flops_per_token = config.flops_per_token(train.seq_len)
    mfu = lambda side: statistics.median(tokens * flops_per_token / medians[side] / rate
                                         for medians, rate in per_block if side in medians)
    jax_median = statistics.median(times["jax"])
    result = {
        "config": name, "batch_size": train.batch_size, "seq_len": train.seq_len, "moe_impl": config.moe_impl,
        "tokens_per_sec": tokens / jax_median,
        "step_time_median_s": jax_median,
        "mfu": mfu("jax"),
        "train_flops_per_token": flops_per_token,
        "matmul_flops_per_sec": statistics.median(rate for _, rate in per_block),
        "peak_rss_mb": peak_rss_mb,
        "final_loss": last_loss(),
        "malloc_tuned": reusing_freed_memory(),
        "huge_pages": on_huge_pages(),
        "torch_experts_implementation": torch_runs["torch"].experts_implementation if torch_runs else None,
    }
    for prefix in TORCH_RUNS:
        median = statistics.median(times[prefix]) if times.get(prefix) else None
        result |= {
            f"{prefix}_tokens_per_sec": tokens / median if median else None,
            f"{prefix}_step_time_median_s": median,
            f"{prefix}_mfu": mfu(prefix) if median else None,
            f"speedup_vs_{prefix}": statistics.median(medians[prefix] / medians["jax"] for medians, _ in per_block
                                                      if prefix in medians) if median else None,
        }
    result["goals"] = GOALS
    result["meets_goals"] = {k: None if result[k] is None else result[k] >= goal for k, goal in GOALS.items()}
    return result


def _share(total: int, blocks: int, block: int) -> int:
    """Block `block`'s part of `total` steps split as evenly as possible."""
    return total // blocks + (block < total % blocks)
