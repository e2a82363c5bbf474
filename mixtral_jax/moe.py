"""The sparse mixture-of-experts block: route, dispatch to experts, combine.

Routing, the expert compute paths and the auxiliary losses are pure functions;
`MoE` is the glue holding the parameters. Every expert path has the signature
of `ExpertsFn`, so the plain reference (every expert on every token, the test
oracle), the dropless sorted paths (grouped blocks on CPU, `ragged_dot` on
GPU/TPU) and the expert-parallel path in `mixtral_jax.sharding` are
interchangeable.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.layers import EMBED, EXPERT, MLP, matmul, param

# experts_fn(x [N, D], expert_idx [N, k] int32, expert_weights [N, k],
#            w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]) -> (y [N, D], dropped_fraction)
ExpertsFn = Callable[..., tuple[jax.Array, jax.Array]]


class MoEAux(NamedTuple):
    """Router statistics of one MoE layer (stacked to [L, ...] by the decoder).

    Sums rather than means, so that layers, micro-batches and hosts pool
    exactly; padding tokens (token_mask 0) are left out.
    """

    tokens_per_expert: jax.Array  # [E] float32: (token, slot) assignments per expert
    router_prob_sum: jax.Array  # [E] float32: sum over tokens of softmax(router logits)
    num_tokens: jax.Array  # [] float32: tokens counted
    z_loss_sum: jax.Array  # [] float32: sum over tokens of logsumexp(logits)^2
    dropped_fraction: jax.Array  # [] float32: (token, slot) pairs over capacity


def route(router_logits, top_k: int):
    """Mixtral's top-k routing: softmax, keep the top k, renormalise over them.

    router_logits: [N, E] float32 -> (weights [N, k] float32, expert_idx [N, k] int32).
    """
    probs = jax.nn.softmax(router_logits, axis=-1)
    weights, expert_idx = jax.lax.top_k(probs, top_k)
    return weights / jnp.sum(weights, axis=-1, keepdims=True), expert_idx.astype(jnp.int32)


def router_stats(router_logits, expert_idx, token_mask, dropped_fraction) -> MoEAux:
    """The statistics the load-balancing and z losses need; token_mask: [N] (1 = counted)."""
    mask = token_mask.astype(jnp.float32)
    num_experts = router_logits.shape[-1]
    assigned = jax.nn.one_hot(expert_idx, num_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    probs = jax.nn.softmax(router_logits, axis=-1)
    lse = jax.nn.logsumexp(router_logits, axis=-1)
    return MoEAux(
        tokens_per_expert=mask @ assigned,
        router_prob_sum=mask @ probs,
        num_tokens=jnp.sum(mask),
        z_loss_sum=jnp.sum(mask * lse * lse),
        dropped_fraction=jnp.asarray(dropped_fraction, jnp.float32),
    )


def load_balancing_loss(aux: MoEAux, style: str = "pooled"):
    """The auxiliary load-balancing loss from stacked per-layer stats [L, ...].

    "pooled" is transformers' `load_balancing_loss_func`: token fractions and
    mean router probabilities pooled over all layers, E * sum_e f_e * P_e.
    "per_layer" is the mean over layers of the same Switch-Transformer loss.
    Both equal top_k when the load is perfectly balanced.
    """
    num_experts = aux.tokens_per_expert.shape[-1]
    if style == "pooled":
        total = jnp.maximum(jnp.sum(aux.num_tokens), 1.0)
        fraction = jnp.sum(aux.tokens_per_expert, axis=0) / total
        prob = jnp.sum(aux.router_prob_sum, axis=0) / total
        return num_experts * jnp.sum(fraction * prob)
    if style == "per_layer":
        count = jnp.maximum(aux.num_tokens, 1.0)[:, None]
        per_layer = jnp.sum(aux.tokens_per_expert / count * (aux.router_prob_sum / count), axis=-1)
        return num_experts * jnp.mean(per_layer)
    raise ValueError(f"unknown load-balancing loss style {style!r}")


def router_z_loss(aux: MoEAux):
    """ST-MoE router z-loss: mean over layers and tokens of logsumexp(logits)^2."""
    return jnp.sum(aux.z_loss_sum) / jnp.maximum(jnp.sum(aux.num_tokens), 1.0)


def expert_load(aux: MoEAux):
    """Fraction of routed (token, slot) pairs per layer and expert: [L, E], rows sum to 1."""
    return aux.tokens_per_expert / jnp.maximum(jnp.sum(aux.tokens_per_expert, -1, keepdims=True), 1.0)


# ---- expert compute paths --------------------------------------------------------------------
def swiglu(x, w_gate, w_up, w_down):
    """One SwiGLU expert: x [M, D] -> [M, D]."""
    return matmul(jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


def reference_experts(x, expert_idx, expert_weights, w_gate, w_up, w_down):
    """Every expert on every token, masked by the router: simple, E/k times the work."""
    num_experts = w_gate.shape[0]
    combine = jnp.einsum("nk,nke->ne", expert_weights,
                         jax.nn.one_hot(expert_idx, num_experts, dtype=expert_weights.dtype))
    hidden = jax.nn.silu(jnp.einsum("nd,edf->enf", x, w_gate)) * jnp.einsum("nd,edf->enf", x, w_up)
    out = jnp.einsum("enf,efd->end", hidden, w_down)  # [E, N, D]
    return jnp.einsum("ne,end->nd", combine.astype(out.dtype), out), jnp.zeros((), jnp.float32)


def sort_by_expert(expert_idx, num_experts: int):
    """Orders the N*k (token, slot) pairs by expert.

    Returns order [N*k] (sorted row -> flat pair index), its inverse, and
    group_sizes [E] (rows per expert, in expert order).
    """
    flat = expert_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return order, inverse, jnp.bincount(flat, length=num_experts).astype(jnp.int32)


def sorted_experts(ffn_sorted) -> ExpertsFn:
    """A dropless ExpertsFn from a grouped FFN over expert-sorted rows.

    ffn_sorted(x_sorted [M, D], group_sizes [E], w_gate, w_up, w_down) -> [M, D]
    runs expert e on the group_sizes[e] rows that follow the groups before it.
    """

    def experts(x, expert_idx, expert_weights, w_gate, w_up, w_down):
        n, k = expert_idx.shape
        order, inverse, group_sizes = sort_by_expert(expert_idx, w_gate.shape[0])
        y_sorted = ffn_sorted(x[order // k], group_sizes, w_gate, w_up, w_down)  # [N*k, D]
        y = y_sorted[inverse].reshape(n, k, -1)
        return jnp.einsum("nkd,nk->nd", y, expert_weights.astype(y.dtype)), jnp.zeros((), jnp.float32)

    return experts


def ragged_ffn(x_sorted, group_sizes, w_gate, w_up, w_down):
    """Grouped SwiGLU with `jax.lax.ragged_dot` (GPU/TPU; on CPU it computes every group densely)."""
    gate = jax.lax.ragged_dot(x_sorted, w_gate, group_sizes)
    up = jax.lax.ragged_dot(x_sorted, w_up, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def resolve_impl(moe_impl: str) -> str:
    """The expert path `moe_impl` means here: "auto" is "grouped" on CPU, else "ragged"."""
    if moe_impl == "auto":
        return "grouped" if jax.default_backend() == "cpu" else "ragged"
    return moe_impl


def experts_fn_for(moe_impl: str, rows_per_expert: int | None = None) -> ExpertsFn:
    """The single-device ExpertsFn a config's `moe_impl` names ("auto" picks by backend).

    rows_per_expert: the rows an expert gets on average, when fewer than the
    rows given over the experts (the expert-parallel path's buffers hold
    padding); the grouped path sizes its batched slots by it.
    """
    moe_impl = resolve_impl(moe_impl)
    if moe_impl == "reference":
        return reference_experts
    if moe_impl == "ragged":
        return sorted_experts(ragged_ffn)
    if moe_impl == "grouped":
        from mixtral_jax._grouped import default_capacity, grouped_ffn

        capacity = None if rows_per_expert is None else default_capacity(rows_per_expert)
        return sorted_experts(functools.partial(grouped_ffn, capacity=capacity))
    raise ValueError(f"unknown moe_impl {moe_impl!r}")


class MoE(nnx.Module):
    """Router + SwiGLU experts; returns the combined output and the router statistics."""

    def __init__(self, embed: int, mlp: int, num_experts: int, top_k: int, *, init_std: float,
                 param_dtype, dtype, rngs: nnx.Rngs):
        self.top_k = top_k
        self.dtype = dtype
        self.router = param(rngs, (embed, num_experts), (EMBED, None), param_dtype, init_std)
        self.w_gate = param(rngs, (num_experts, embed, mlp), (EXPERT, EMBED, MLP), param_dtype, init_std)
        self.w_up = param(rngs, (num_experts, embed, mlp), (EXPERT, EMBED, MLP), param_dtype, init_std)
        self.w_down = param(rngs, (num_experts, mlp, embed), (EXPERT, MLP, EMBED), param_dtype, init_std)

    def __call__(self, x, experts_fn: ExpertsFn, token_mask=None):
        """x: [B, T, D] -> ([B, T, D], MoEAux); token_mask [B, T] excludes padding from the stats."""
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        router_logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # [N, E]
        weights, expert_idx = route(router_logits, self.top_k)
        cast = lambda w: w[...].astype(self.dtype)
        y, dropped = experts_fn(x.astype(self.dtype), expert_idx, weights.astype(self.dtype),
                                cast(self.w_gate), cast(self.w_up), cast(self.w_down))
        mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(b * t)
        return y.reshape(b, t, d), router_stats(router_logits, expert_idx, mask, dropped)
