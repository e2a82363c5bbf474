"""Timing helpers shared by the benchmarks: medians of repeated, synchronised runs."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp


def median_seconds(fn, *args, warmup: int = 2, repeats: int = 7) -> float:
    """Median wall time of `fn(*args)` (blocked until ready) after `warmup` untimed calls."""
    times = alternating_seconds({"fn": functools.partial(fn, *args)}, warmup=warmup, repeats=repeats)
    return statistics.median(times["fn"])


def alternating_seconds(calls: dict, warmup: int = 2, repeats: int = 7) -> dict[str, list[float]]:
    """Wall times of each `calls[name]()` (blocked until ready) over `repeats` rounds that run
    every call once in turn, after `warmup` untimed rounds: a load change on a shared machine
    then hits all of them alike. Returns {name: [seconds per round]}."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios of two `alternating_seconds` series."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def matmul_flops_per_second(size: int = 4096, dtype=jnp.float32, repeats: int = 5,
                            precision: str = "float32") -> float:
    """The matmul rate JAX reaches here: a size x size x size product, FLOP/s (median), at a
    model's compute dtype and `matmul_precision` (a GPU's TensorFloat-32 rate is several
    times its float32 one)."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = functools.partial(_matmul, precision=precision)
    return 2 * size**3 / median_seconds(matmul, a, b, repeats=repeats)


@functools.partial(jax.jit, static_argnames="precision")
def _matmul(a, b, precision: str):
    with jax.default_matmul_precision(precision):
        return a @ b
