"""The expert-parallel case of `mixtral-jax bench moe`: one MoE layer's forward + backward
with experts spread over a simulated mesh (shard_map + all_to_all), against the same
layer on one device, and the bytes its all_to_alls move.

The simulated devices share this machine's cores, so the ratio measures the overhead of
dispatch, buffers and collectives, not a speed-up. The two layers alternate in rounds;
the ratio is the median of per-round ratios. Needs its own process (the device count is
fixed when JAX starts): `expert_parallel_case` starts one; `python -m
mixtral_jax.sharding.bench '{"tokens": 4096, ...}'` is that process.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4}
_ALL_TO_ALL = re.compile(r"^\s*%?[\w.-]+ = (.*?) all-to-all\(", re.MULTILINE)  # group 1: the result type
_SHAPE = re.compile(r"(f32|bf16|f16|s32|u32)\[([\d,]*)\]")


def all_to_all_bytes(hlo_text: str) -> tuple[int, int]:
    """(all-to-all ops, bytes of their per-device buffers summed) in a compiled HLO module."""
    count = total = 0
    for match in _ALL_TO_ALL.finditer(hlo_text):
        count += 1
        for dtype, dims in _SHAPE.findall(match.group(1)):
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            total += size * _DTYPE_BYTES[dtype]
    return count, total


def expert_parallel_case(tokens: int = 4096, dim: int = 512, ffn: int = 1792, experts: int = 8,
                         top_k: int = 2, dtype: str = "float32", repeats: int = 5, expert: int = 8,
                         data: int = 1, capacity_factor: float = 0.0, timeout: float = 1800) -> dict:
    """Runs the case in a fresh process with expert x data simulated CPU devices; returns its dict."""
    case = dict(tokens=tokens, dim=dim, ffn=ffn, experts=experts, top_k=top_k, dtype=dtype,
                repeats=repeats, expert=expert, data=data, capacity_factor=capacity_factor)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(expert * data)}
    done = subprocess.run([sys.executable, "-m", "mixtral_jax.sharding.bench", json.dumps(case)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"expert-parallel bench failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(tokens, dim, ffn, experts, top_k, dtype, repeats, expert, data, capacity_factor) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mixtral_jax import moe, sharding
    from mixtral_jax.benchmarks.moe import moe_case, moe_grad
    from mixtral_jax.benchmarks.timing import alternating_seconds, median_ratio
    from mixtral_jax.config import MixtralConfig

    graphdef, state, x = moe_case(tokens, dim, ffn, experts, top_k, dtype)
    single_grad = moe_grad(moe.experts_fn_for("grouped"), graphdef)

    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, expert=expert))
    config = MixtralConfig(hidden_size=dim, intermediate_size=ffn, num_local_experts=experts,
                           num_experts_per_tok=top_k, capacity_factor=capacity_factor, moe_impl="grouped")
    experts_fn = sharding.experts_fn(mesh, config)
    ep_state = jax.device_put(state, sharding.param_shardings(state, mesh))
    ep_x = jax.device_put(x.reshape(-1, 1, dim), sharding.batch_sharding(mesh, 3))  # [N, 1, D]: tokens as rows
    ep_grad = moe_grad(experts_fn, graphdef)

    def expert_parallel():
        with sharding.use_mesh(mesh):
            return ep_grad(ep_state, ep_x)

    times = alternating_seconds({"single": lambda: single_grad(state, x), "parallel": expert_parallel},
                                repeats=repeats)

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x, experts_fn)
        return 0.5 * jnp.sum(jnp.square(y.astype(jnp.float32))), aux.dropped_fraction

    with sharding.use_mesh(mesh):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
        count, moved = all_to_all_bytes(grad.lower(ep_state, ep_x).compile().as_text())
        dropped = float(grad(ep_state, ep_x)[1])
    local = tokens // (data * expert)
    return {
        "mesh": dict(mesh.shape), "capacity_factor": capacity_factor,
        "capacity": sharding.capacity(local, top_k, experts, capacity_factor),
        "expert_parallel_seconds": statistics.median(times["parallel"]),
        "single_device_seconds": statistics.median(times["single"]),
        "ratio_vs_single_device": median_ratio(times["parallel"], times["single"]),
        "all_to_all_ops": count,  # forward dispatch + combine and their transposes
        "all_to_all_bytes_per_device": moved,  # buffers each device hands to all_to_all per step
        "all_to_all_bytes_leaving_device": moved * (expert - 1) // expert,
        "dropped_fraction": dropped,
    }


if __name__ == "__main__":
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
