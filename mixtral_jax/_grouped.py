"""Grouped SwiGLU over expert-sorted rows for CPU: cost follows the active experts.

`jax.lax.ragged_dot` on XLA:CPU computes every group densely (E/k times the
useful work). Here the work comes in two parts, and no row is dropped:

- Slots: the first C rows of every expert's group are gathered into an
  [E, C, D] array (empty slots zero) and run as batched matmuls, one per
  projection for all experts at once. For ~128-row groups these run at
  about twice the FLOP rate of one matmul per expert (bench-tiny's MoE layer
  forward and backward 1.29x faster than the loop below alone; its training
  step 1.09x). C is a little over the even split (`default_capacity`), so
  random routing rarely leaves rows over.
- Overflow: the rows past C of each group run in a loop over the experts
  that have any. It takes each expert's weights once (XLA:CPU copies a slice
  of a stacked weight before a matmul reads it, so the copy is paid per
  expert, not per block) and runs the rows as ordinary matmuls on fixed-size
  blocks, in inner loops with dynamic trip counts, so only blocks that hold
  rows run. The rows, rounded up to a multiple of r, are covered by whole
  R-row blocks, then at most one block each of R/2, R/4, ..., r rows (the
  binary digits of what is left; a group of 121 rows takes one 128-row block
  rather than 64 + 32 + 16 + 16). The last block may run past the group's
  end by under r rows, into later groups' slots, which the slots' results
  then replace.

The backward pass is written by hand (`jax.custom_vjp`), because a loop with
a dynamic trip count is not reverse-differentiable: the slots' gradients as
batched matmuls from the saved gate and up pre-activations, the overflow's
by the same blocks with the spilled rows masked out, recomputing the
pre-activations and summing each expert's weight gradients in the loop's
carry.

Letters: M sorted rows (tokens x top-k), D model dim, F expert ffn dim,
E experts, C slots per expert, R rows per head block, r rows per smallest block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_ROWS = 256  # rows per block of a group's head (R); see `mixtral-jax bench moe`
TAIL_ROWS = 16  # rows of a group's last block (r <= R): bounds the wasted rows per expert


def head_blocks(num_rows: int, block_rows: int, tail_rows: int) -> list[int]:
    """The block sizes above r a group may take, largest first: R, R/2, ..., those no larger
    than the num_rows there are."""
    halvings = [block_rows >> i for i in range(block_rows.bit_length()) if (block_rows >> i) > tail_rows]
    return [block for block in halvings if block <= num_rows]


def run_group_blocks(start, size, heads: list[int], tail_rows: int, block_body, carry):
    """carry = block_body(block, first_row, group_end, carry) over the blocks of the group of
    `size` rows from row `start`: greedily, blocks of each `heads` size, then of r rows,
    each taken while it runs past what is left by under r rows in all (with R / r a power
    of two: the size rounded up to a multiple of r, in whole R-row blocks and then one
    block per binary digit). The last block spills past the group's end by under r rows.
    The loops have dynamic trip counts: an empty group runs no block."""
    first, rest = start, size
    for block in heads + [tail_rows]:
        count = (rest + tail_rows - 1) // block  # rest >= 1 - r: a block may overrun by under r rows
        step = lambda b, c, first=first, block=block: block_body(block, first + b * block, start + size, c)
        carry = jax.lax.fori_loop(0, count, step, carry)
        first, rest = first + count * block, rest - count * block
    return carry


def _for_each_expert(starts, sizes, num_rows: int, block_rows: int, tail_rows: int, expert_body, carry):
    """carry = expert_body(e, run_blocks, carry) for each e = 0 .. E - 1 with rows to run, in order.

    run_blocks(block_body, carry) is `run_group_blocks` over the sizes[e] rows from starts[e].
    """
    heads = head_blocks(num_rows, block_rows, tail_rows)

    def expert_step(e, carry):
        run_blocks = functools.partial(run_group_blocks, starts[e], sizes[e], heads, tail_rows)
        return jax.lax.cond(sizes[e] > 0, lambda c: expert_body(e, run_blocks, c), lambda c: c, carry)

    return jax.lax.fori_loop(0, sizes.shape[0], expert_step, carry)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_capacity(rows_per_expert: int, tail_rows: int = TAIL_ROWS) -> int:
    """C for experts that get `rows_per_expert` rows on average: that rounded up to a
    multiple of r, plus r (room for the imbalance of random routing: bench-tiny's MoE
    layer 1.1x faster than without)."""
    return _round_up(rows_per_expert, tail_rows) + tail_rows


def _slots(group_sizes, num_rows: int, capacity: int):
    """Where the batched part's slots read and write: each expert's first C rows.

    Returns take [E, C] (the sorted row in each slot, M for an empty one), back [M]
    (each row's flat slot e * C + c, E * C for rows past their expert's C or past the
    last group) and the overflow: the first row and count of each group's rows past C.
    """
    num_experts = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    slot = jnp.arange(capacity)
    take = jnp.where(slot < group_sizes[:, None], starts[:, None] + slot, num_rows)  # [E, C]
    rows = jnp.arange(num_rows)
    expert = jnp.searchsorted(ends, rows, side="right")  # [M]: E past the last group
    row_slot = rows - starts[jnp.minimum(expert, num_experts - 1)]
    back = jnp.where((expert < num_experts) & (row_slot < capacity), expert * capacity + row_slot,
                     num_experts * capacity)
    return take, back, (starts + capacity, jnp.maximum(group_sizes - capacity, 0))


def _take(a, index):
    """a's rows at `index` ([...] int), zeros where the index is past a's end."""
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


def _merge(slot_rows, back, loop_rows):
    """[M, D]: each row from the slots ([E, C, D]) where it has one, else from the loop's
    buffer ([M + r, D]); the slots replace what the overflow's spilled tails wrote there."""
    from_slots = _take(slot_rows.reshape(-1, slot_rows.shape[-1]), back)  # zeros past E * C
    return jnp.where((back < slot_rows.shape[0] * slot_rows.shape[1])[:, None], from_slots, loop_rows[:back.shape[0]])


def _expert(w, e):
    return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _rows(a, first, block):
    return jax.lax.dynamic_slice_in_dim(a, first, block, axis=0)


def _put(a, rows, first):
    return jax.lax.dynamic_update_slice_in_dim(a, rows.astype(a.dtype), first, axis=0)


def _expert_gate_up(w_gate, w_up, e):
    return jnp.concatenate([_expert(w_gate, e), _expert(w_up, e)], axis=-1)  # [D, 2F]


def _forward(x_sorted, group_sizes, w_gate, w_up, w_down, capacity, block_rows, tail_rows):
    """y [M, D] and the slots' gate and up pre-activations [E, C, F] (the backward's residuals)."""
    m = x_sorted.shape[0]
    f = w_gate.shape[-1]
    take, back, (over_starts, over_sizes) = _slots(group_sizes, m, capacity)
    x_slots = _take(x_sorted, take)  # [E, C, D]
    gate, up = (jnp.einsum("ecd,edf->ecf", x_slots, w) for w in (w_gate, w_up))  # [E, C, F]
    y_slots = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down)  # [E, C, D]

    x = jnp.pad(x_sorted, ((0, tail_rows), (0, 0)))  # [M + r, D]

    def expert_body(e, run_blocks, y):
        w_gate_up, w_down_e = _expert_gate_up(w_gate, w_up, e), _expert(w_down, e)

        def block_body(block, first, end, y):
            gub = _rows(x, first, block) @ w_gate_up  # [block, 2F]
            return _put(y, (jax.nn.silu(gub[:, :f]) * gub[:, f:]) @ w_down_e, first)

        return run_blocks(block_body, y)

    y = _for_each_expert(over_starts, over_sizes, m, block_rows, tail_rows, expert_body, jnp.zeros_like(x))
    y = _merge(y_slots, back, y)
    grouped = jnp.arange(m) < jnp.sum(group_sizes)  # [M]: rows past the last group stay 0
    return jnp.where(grouped[:, None], y, 0), (gate, up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _grouped(x_sorted, group_sizes, w_gate, w_up, w_down, capacity, block_rows, tail_rows, precision):
    return _forward(x_sorted, group_sizes, w_gate, w_up, w_down, capacity, block_rows, tail_rows)[0]


def _grouped_fwd(x_sorted, group_sizes, w_gate, w_up, w_down, capacity, block_rows, tail_rows, precision):
    y, pre_activations = _forward(x_sorted, group_sizes, w_gate, w_up, w_down, capacity, block_rows, tail_rows)
    return y, (x_sorted, group_sizes, w_gate, w_up, w_down, pre_activations)


def _grouped_bwd(capacity, block_rows, tail_rows, precision, residuals, dy):
    with jax.default_matmul_precision(precision):  # the forward's, which JAX traces the backward outside of
        return _backward(capacity, block_rows, tail_rows, residuals, dy)


def _silu_grads(dh, gate, up):
    """The gradients of silu(gate) * up given dh, and silu(gate): (dgate, dup, silu(gate))."""
    sig = jax.nn.sigmoid(gate)
    act = gate * sig
    return dh * up * (sig * (1 + gate * (1 - sig))), dh * act, act


def _backward(capacity, block_rows, tail_rows, residuals, dy):
    x_sorted, group_sizes, w_gate, w_up, w_down, (gate, up) = residuals
    m, d = x_sorted.shape
    f = w_gate.shape[-1]
    acc = jnp.float32  # weight gradients sum over many rows
    take, back, (over_starts, over_sizes) = _slots(group_sizes, m, capacity)

    x_slots, dy_slots = _take(x_sorted, take), _take(dy, take)  # [E, C, D]
    dgate, dup, act = _silu_grads(jnp.einsum("ecd,efd->ecf", dy_slots, w_down), gate, up)  # [E, C, F]
    dx_slots = jnp.einsum("ecf,edf->ecd", dgate, w_gate) + jnp.einsum("ecf,edf->ecd", dup, w_up)
    # the weight gradients a_t [E, I, C] @ b [E, C, O], a_t transposed into a buffer of its own:
    # contracting the slots of an [E, C, I] operand runs ~1.5x slower on XLA:CPU
    transposed = lambda a: jax.lax.optimization_barrier(jnp.swapaxes(a, 1, 2))
    slot_grad = lambda a_t, b: jnp.einsum("eic,eco->eio", a_t, b, preferred_element_type=acc)
    x_slots_t = transposed(x_slots)  # [E, D, C]
    dw_gate, dw_up = slot_grad(x_slots_t, dgate), slot_grad(x_slots_t, dup)  # [E, D, F]
    dw_down = slot_grad(transposed(act * up), dy_slots)  # [E, F, D]

    # the overflow: each block's pre-activations recomputed
    x = jnp.pad(x_sorted, ((0, tail_rows), (0, 0)))  # [M + r, D]
    dy = jnp.pad(dy, ((0, tail_rows), (0, 0)))

    def expert_body(e, run_blocks, carry):
        dx, dw_gate, dw_up, dw_down = carry
        w_gate_up = _expert_gate_up(w_gate, w_up, e)  # [D, 2F]
        # [2F, D], made a real array: a transposed operand slows XLA:CPU's matmul ~2x here
        w_gate_up_t = jax.lax.optimization_barrier(w_gate_up.T)
        w_down_e = _expert(w_down, e)  # [F, D]

        def block_body(block, first, end, carry):
            dx, dw_gu, dw_dn = carry
            in_region = (first + jnp.arange(block)) < end  # [block]: rows this group owns
            xb = _rows(x, first, block)
            dyb = jnp.where(in_region[:, None], _rows(dy, first, block), 0)  # [block, D]
            gub = xb @ w_gate_up  # [block, 2F]
            dgb, dub, actb = _silu_grads(dyb @ w_down_e.T, gub[:, :f], gub[:, f:])  # [block, F]
            dgu = jnp.concatenate([dgb, dub], axis=-1)  # [block, 2F]
            grad = lambda a, b: jnp.matmul(a.T, b, preferred_element_type=acc)
            return _put(dx, dgu @ w_gate_up_t, first), dw_gu + grad(xb, dgu), dw_dn + grad(actb * gub[:, f:], dyb)

        dx, dw_gu, dw_dn = run_blocks(block_body, (dx, jnp.zeros((d, 2 * f), acc), jnp.zeros((f, d), acc)))
        add = lambda w, g: jax.lax.dynamic_update_index_in_dim(w, _expert(w, e) + g, e, axis=0)
        return dx, add(dw_gate, dw_gu[:, :f]), add(dw_up, dw_gu[:, f:]), add(dw_down, dw_dn)

    dx, dw_gate, dw_up, dw_down = _for_each_expert(over_starts, over_sizes, m, block_rows, tail_rows, expert_body,
                                                   (jnp.zeros_like(x), dw_gate, dw_up, dw_down))
    dx = _merge(dx_slots, back, dx)
    return dx, None, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype), dw_down.astype(w_down.dtype)


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def grouped_ffn(x_sorted, group_sizes, w_gate, w_up, w_down, *, capacity: int | None = None,
                block_rows: int = BLOCK_ROWS, tail_rows: int = TAIL_ROWS):
    """SwiGLU of expert e on the group_sizes[e] rows that follow the groups before it.

    x_sorted: [M, D] rows sorted by expert; group_sizes: [E] int32 summing to
    at most M (rows past the last group give 0); w_gate, w_up: [E, D, F];
    w_down: [E, F, D] -> [M, D]. Differentiable in x and the three weights.
    Use as `moe.sorted_experts(grouped_ffn)`. capacity (C, a positive multiple
    of r): the rows per expert run in the batched matmuls, `default_capacity`
    of M / E when None, never more than M. block_rows (R) and tail_rows (r)
    shape the overflow's blocks: loop overhead against wasted rows (at most
    r - 1 per expert).
    """
    if not 0 < tail_rows <= block_rows:
        raise ValueError(f"need 0 < tail_rows <= block_rows, got {tail_rows} and {block_rows}")
    num_rows, num_experts = x_sorted.shape[0], group_sizes.shape[0]
    if capacity is None:
        capacity = default_capacity(-(-num_rows // num_experts), tail_rows)
    if capacity <= 0 or capacity % tail_rows:
        raise ValueError(f"capacity must be a positive multiple of tail_rows ({tail_rows}), got {capacity}")
    capacity = min(capacity, _round_up(num_rows, tail_rows))  # slots past M would stay empty
    precision = jax.config.jax_default_matmul_precision  # the caller's, for the backward's matmuls too
    return _grouped(x_sorted, group_sizes.astype(jnp.int32), w_gate, w_up, w_down, capacity, block_rows,
                    tail_rows, precision)
