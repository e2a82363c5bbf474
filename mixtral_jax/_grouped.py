"""Grouped SwiGLU over expert-sorted rows for CPU: cost follows the active experts.

`jax.lax.ragged_dot` on XLA:CPU computes every group densely (E/k times the
useful work). Here each expert's group of rows runs as ordinary matmuls on
fixed-size blocks, in loops with dynamic trip counts, so only blocks that
hold rows run. A group's head is whole R-row blocks; its tail (fewer than R
rows) is covered by r-row blocks, whose last one may run past the group's
end. Those spilled rows are overwritten later by the experts they belong to
(see `_passes`), so at most r - 1 rows per expert are wasted work. The
backward pass walks the same blocks with the spilled rows masked out; it is
written by hand (`jax.custom_vjp`) because a loop with a dynamic trip count
is not reverse-differentiable. The gate and up pre-activations are saved for
it (measured: cheaper than recomputing them).

Letters: M sorted rows (tokens x top-k), D model dim, F expert ffn dim,
E experts, R rows per head block, r rows per tail block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_ROWS = 256  # rows per block of a group's head (R); see `mixtral-jax bench moe`
TAIL_ROWS = 64  # rows per block of a group's tail (r < R): bounds the wasted rows per expert


def _passes(group_sizes, num_rows: int, block_rows: int, tail_rows: int):
    """The two passes over every group, in the order they must run.

    Each group splits into a head of whole R-row blocks and a tail shorter
    than R covered by r-row blocks. Tails run first: a tail's last block may
    spill past its group's end, into rows that a later tail or any head then
    overwrites. Heads never spill. Returns (first row [E], rows [E], block rows) per pass.
    """
    starts = jnp.cumsum(group_sizes) - group_sizes  # [E] first row of each group
    if block_rows > num_rows:  # no group fills a head block
        return ((starts, group_sizes, tail_rows),)
    head = group_sizes // block_rows * block_rows  # [E]
    return ((starts + head, group_sizes - head, tail_rows), (starts, head, block_rows))


def _for_each_block(group_sizes, num_rows: int, block_rows: int, tail_rows: int, body, carry):
    """carry = body(block, expert, first_row, region_end, carry) for every block, in a safe order."""
    for starts, sizes, block in _passes(group_sizes, num_rows, block_rows, tail_rows):
        carry = _run_pass(starts, sizes, block, body, carry)
    return carry


def _run_pass(starts, sizes, block: int, body, carry):
    """One loop over the blocks covering rows [starts[e], starts[e] + sizes[e]) of every expert e.

    Its trip count is the number of blocks that hold rows; block b belongs
    to the first expert whose blocks end after b.
    """
    counts = (sizes + block - 1) // block  # [E] blocks per expert
    block_ends = jnp.cumsum(counts)  # [E]

    def step(b, carry):
        expert = jnp.sum(block_ends <= b)
        first = starts[expert] + (b - block_ends[expert] + counts[expert]) * block
        return body(block, expert, first, starts[expert] + sizes[expert], carry)

    return jax.lax.fori_loop(0, block_ends[-1], step, carry)


def _expert(w, e):
    return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _rows(a, first, block):
    return jax.lax.dynamic_slice_in_dim(a, first, block, axis=0)


def _put(a, rows, first):
    return jax.lax.dynamic_update_slice_in_dim(a, rows.astype(a.dtype), first, axis=0)


def _forward(x_sorted, group_sizes, w_gate, w_up, w_down, block_rows, tail_rows):
    """y [M, D] and the pre-activations gate, up [M + r, F] (padded for the last tail's spill)."""
    m, d = x_sorted.shape
    x = jnp.pad(x_sorted, ((0, tail_rows), (0, 0)))  # [M + r, D]
    rows_ffn = (m + tail_rows, w_gate.shape[-1])

    def body(block, e, first, end, carry):
        y, gate, up = carry
        xb = _rows(x, first, block)  # [block, D]
        gb, ub = xb @ _expert(w_gate, e), xb @ _expert(w_up, e)  # [block, F]
        yb = (jax.nn.silu(gb) * ub) @ _expert(w_down, e)  # [block, D]
        return _put(y, yb, first), _put(gate, gb, first), _put(up, ub, first)

    init = (jnp.zeros_like(x), jnp.zeros(rows_ffn, x.dtype), jnp.zeros(rows_ffn, x.dtype))
    y, gate, up = _for_each_block(group_sizes, m, block_rows, tail_rows, body, init)
    grouped = jnp.arange(m) < jnp.sum(group_sizes)  # [M]: rows past the last group stay 0
    return jnp.where(grouped[:, None], y[:m], 0), (gate, up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _grouped(x_sorted, group_sizes, w_gate, w_up, w_down, block_rows, tail_rows):
    return _forward(x_sorted, group_sizes, w_gate, w_up, w_down, block_rows, tail_rows)[0]


def _grouped_fwd(x_sorted, group_sizes, w_gate, w_up, w_down, block_rows, tail_rows):
    y, (gate, up) = _forward(x_sorted, group_sizes, w_gate, w_up, w_down, block_rows, tail_rows)
    return y, (x_sorted, group_sizes, w_gate, w_up, w_down, gate, up)


def _grouped_bwd(block_rows, tail_rows, residuals, dy):
    x_sorted, group_sizes, w_gate, w_up, w_down, gate, up = residuals
    m = x_sorted.shape[0]
    x = jnp.pad(x_sorted, ((0, tail_rows), (0, 0)))  # [M + r, D]
    dy = jnp.pad(dy, ((0, tail_rows), (0, 0)))
    acc = jnp.float32  # weight gradients sum over many blocks

    def body(block, e, first, end, carry):
        dx, dw_gate, dw_up, dw_down = carry
        in_region = (first + jnp.arange(block)) < end  # [block]: rows this block owns
        xb = _rows(x, first, block)
        dyb = jnp.where(in_region[:, None], _rows(dy, first, block), 0)  # [block, D]
        gb, ub = _rows(gate, first, block), _rows(up, first, block)  # [block, F]
        sig = jax.nn.sigmoid(gb)
        act = gb * sig  # silu(gate)
        dh = dyb @ _expert(w_down, e).T  # [block, F]
        dgate = dh * ub * (sig * (1 + gb * (1 - sig)))
        dup = dh * act
        dxb = dgate @ _expert(w_gate, e).T + dup @ _expert(w_up, e).T  # [block, D]
        add = lambda w, a, b: jax.lax.dynamic_update_index_in_dim(
            w, _expert(w, e) + jnp.matmul(a.T, b, preferred_element_type=acc), e, axis=0)
        return (_put(dx, dxb, first), add(dw_gate, xb, dgate), add(dw_up, xb, dup),
                add(dw_down, act * ub, dyb))

    init = (jnp.zeros_like(x), jnp.zeros(w_gate.shape, acc), jnp.zeros(w_up.shape, acc),
            jnp.zeros(w_down.shape, acc))
    dx, dw_gate, dw_up, dw_down = _for_each_block(group_sizes, m, block_rows, tail_rows, body, init)
    return (dx[:m], None, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
            dw_down.astype(w_down.dtype))


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, *, block_rows: int = BLOCK_ROWS,
                tail_rows: int = TAIL_ROWS):
    """SwiGLU of expert e on the group_sizes[e] rows that follow the groups before it.

    x_sorted: [M, D] rows sorted by expert; group_sizes: [E] int32 summing to
    at most M (rows past the last group give 0); w_gate, w_up: [E, D, F];
    w_down: [E, F, D] -> [M, D]. Differentiable in x and the three weights.
    Use as `moe.sorted_experts(grouped_ffn)`. block_rows (R) and tail_rows (r)
    trade loop overhead against wasted rows (at most r - 1 per expert).
    """
    if not 0 < tail_rows <= block_rows:
        raise ValueError(f"need 0 < tail_rows <= block_rows, got {tail_rows} and {block_rows}")
    return _grouped(x_sorted, group_sizes.astype(jnp.int32), w_gate, w_up, w_down, block_rows, tail_rows)
