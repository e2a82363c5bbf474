"""The dense building blocks: parameters with logical axis names, RMSNorm,
rotary embeddings and grouped-query attention with an optional sliding window
and key/value cache.

Einsum letters used throughout the model:
  B batch, T query length, S key length, D model dim, N query heads,
  K kv heads, G query heads per kv head (N = K*G), H head dim,
  E experts, F expert ffn dim, V vocab, L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from flax.core import spmd

from mixtral_jax.cpuinfo import cpu_description, read_cpuinfo

# Logical axis names carried by parameters; sharding/ maps them to mesh axes.
EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERT, NORM, LAYERS = (
    "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "expert", "norm", "layers")

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully-masked rows stay NaN-free


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
          stddev: float | None) -> nnx.Param:
    """A parameter initialised N(0, stddev) (ones when stddev is None) with logical axes."""
    if stddev is None:
        value = jnp.ones(shape, dtype)
    else:
        value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=axes, eager_sharding=False)


def constrain(x, axes: tuple[str | None, ...]):
    """Pins an activation's sharding by logical axis names, under the mesh and
    logical rules set by `mixtral_jax.sharding`; a no-op without them."""
    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spmd.apply_rules(axes, rules))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and cast back (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), (NORM,), param_dtype, None)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary embedding in the rotate-half layout of Hugging Face checkpoints.

    x: [B, T, heads, H]; positions: [B, T] int. Angles in float32.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class KVCache(NamedTuple):
    """The key/value cache of every layer, carried through the decoder's layer loop
    and updated in place (a loop over decode steps never copies it whole).

    k: [L, B, K, H, S], slots minor; v: [L, B, K, S, H], head dim minor. Each
    is then the operand of a decode step's matmul that XLA:CPU reads as stored:
    the scores contract the keys' head dim against the query, the weighted sum
    the values' slots against the probabilities (keys stored slots before
    heads were copied transposed every step; with values stored like the keys,
    the weighted sum ran 4-5x slower: bench-tiny, batch 32, 0.74 against 0.16 ms
    a layer).
    pos: [L, B, S] int32, the position held in each slot, -1 for an empty slot.
    A rolling (sliding-window) cache has S = window and stores position p in
    slot p % S; a full cache has S >= every position.

    `per_layer()` holds the same as tuples of L arrays (the layers' indices
    then static): a decode loop carries that, so that XLA:CPU updates and reads
    each layer's buffer in place instead of copying layer slices of the stack.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def empty(cls, layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        """A cache with every slot empty."""
        k = jnp.zeros((layers, batch, kv_heads, head_dim, size), dtype)
        v = jnp.zeros((layers, batch, kv_heads, size, head_dim), dtype)
        return cls(k, v, jnp.full((layers, batch, size), -1, jnp.int32))

    def per_layer(self) -> KVCache:
        """The cache as tuples of per-layer arrays."""
        return KVCache(*(tuple(stack) for stack in self))

    def stacked(self) -> KVCache:
        """The cache as [L, ...] arrays (the inverse of `per_layer`)."""
        return KVCache(*(jnp.stack(stack) for stack in self))

    def layer(self, index) -> KVCache:
        """Layer `index`'s keys, values and positions: [B, K, H, S], [B, K, S, H], [B, S]."""
        return KVCache(self.k[index], self.v[index], self.pos[index])

    def write(self, index, k, v, positions) -> KVCache:
        """Stores layer `index`'s new keys/values k, v: [B, T, K, H] at `positions`
        [B, T] (-1 = padding, skipped).

        Of new tokens that land on the same slot of a rolling cache only the
        latest is kept, so a prompt longer than the window prefills correctly.
        """
        size = self.pos[0].shape[-1]  # slots
        newest = jnp.max(positions, axis=1, keepdims=True)
        keep = (positions >= 0) & (positions > newest - size)
        slots = jnp.where(keep, positions % size, size)  # slot `size` is out of range: dropped
        rows = jnp.arange(positions.shape[0])[:, None]

        # (rows, slots) broadcast to [B, T] and lead the indexed shape of k, v: [B, T, K, H]
        def put(stack, new, at):  # at: where the new entries go in one layer's array
            if isinstance(stack, tuple):  # per-layer buffers: index is a Python int
                layer = stack[index].at[at].set(new.astype(stack[index].dtype), mode="drop")
                return stack[:index] + (layer,) + stack[index + 1:]
            return stack.at[(index, *at)].set(new.astype(stack.dtype), mode="drop")

        return KVCache(put(self.k, k, (rows, ..., slots)), put(self.v, v, (rows, slice(None), slots)),
                       put(self.pos, positions, (rows, slots)))


def _keys_layout(k):
    """Keys [B, T, K, H] in the cache's layout [B, K, H, T]."""
    return rearrange(k, "b t k h -> b k h t")


def _values_layout(v):
    """Values [B, T, K, H] in the cache's layout [B, K, T, H]."""
    return rearrange(v, "b t k h -> b k t h")


def _skinny_rows(cpuinfo: str) -> tuple[int, int]:
    """The row counts `matmul` runs in the transposed form on the CPU that `cpuinfo`
    (the text of /proc/cpuinfo) describes (inclusive bounds).

    Measured with alternating compiled decode loops in one process. On AVX2
    (Zen 1) Eigen beat YNNPACK from 2 rows on (bench-small's weight shapes:
    1.2-1.45x the GB/s at 2 rows, 1.05-2.1x at 8 and 16, 1.0-1.25x at 32). On
    AVX-512 YNNPACK is the faster one below 16 rows: on Zen 4, bench-tiny's
    decode step 1.08-1.10x faster at batch 4 and 8 (its LM head's matmul is
    half of that step), bench-small within noise (1.03x at batch 8, 0.99x at
    4). At 32 rows Eigen still wins on Zen 4 (bench-small, batch 32: 1.07x),
    YNNPACK on Zen 5 (AMD family 26, full-width AVX-512: a batch-32 step
    1.05-1.06x faster on both presets; the LM head alone 1.07x on bench-tiny).
    """
    cpu = cpu_description(cpuinfo)
    if not cpu.get("avx512"):
        return 2, 32
    return (16, 31) if cpu["cpu_family"] == 26 else (16, 32)  # family 26: AMD's alone


SKINNY_ROWS = _skinny_rows(read_cpuinfo())


def matmul(x, w):
    """x [..., D] @ w [D, *O] -> [..., *O].

    On CPU, for `SKINNY_ROWS` rows (decode), x is copied transposed to [D, rows]
    and contracted over its leading dim. XLA:CPU's YNNPACK matmul takes only
    row-major left operands; this one goes to Eigen instead, which streams the
    weight faster for so few rows. One row is a matrix-vector product either way.
    """
    out_dims = list(range(1, w.ndim))
    rows = x.size // x.shape[-1]
    if jax.default_backend() != "cpu" or not SKINNY_ROWS[0] <= rows <= SKINNY_ROWS[1]:
        return jnp.einsum(x, [..., 0], w, [0, *out_dims], [..., *out_dims])
    x_t = jax.lax.optimization_barrier(x.reshape(rows, x.shape[-1]).T)  # [D, rows], its own buffer
    return jnp.einsum(x_t, [0, w.ndim], w, [0, *out_dims], [w.ndim, *out_dims]).reshape(*x.shape[:-1], *w.shape[1:])


@jax.custom_jvp
def dense(x, w):
    """x [..., D] @ w [D, O] -> [..., O], differentiated so that the weight gradient
    is x^T [D, N] @ g [N, O] (N: the leading dims of x, flattened).

    Left to autodiff, XLA:CPU transposes the output gradient g for the weight
    gradient instead; for the LM head (g is [B, T, V]: 262 MB in bench-small)
    that made a training step 1.09x slower (bench-tiny 1.14x). The gradients
    are the same bits. A JVP rule rather than a VJP, so forward-mode
    (jax.jvp, Hessian-vector products) still works.
    """
    return matmul(x, w)


@dense.defjvp
def _dense_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents
    out = dense(x, w)
    # the weight term as x_t^T dw: its transpose, the weight gradient, is then x_t @ g
    dw_term = jax.lax.dot_general(_rows_transposed(x), dw, (((0,), (0,)), ((), ()))).reshape(out.shape)
    return out, jnp.einsum("...d,do->...o", dx, w) + dw_term


def _rows_transposed(x):
    """x [..., D] as x_t [D, N] (N: x's leading dims, flattened), the weight gradient's left operand."""
    x_t = x.reshape(-1, x.shape[-1]).T
    if jax.default_backend() == "cpu":  # in its own buffer: XLA:CPU would fold the transpose into the
        # weight gradient's matmul, which then runs on Eigen at ~60% of YNNPACK's rate on a row-major x_t
        x_t = jax.lax.optimization_barrier(x_t)
    return x_t


@jax.custom_vjp
def dense_reverse(x, w):
    """`dense` for reverse-mode differentiation only (the training loss's LM head), its two
    backward matmuls in order: the input gradient g @ w^T first, then the weight gradient
    x_t @ g, which reads g through a one-element update that waits for the input gradient.

    The same bits as `dense`. Left unordered, XLA:CPU runs the pair side by
    side, one core each and each slower than alone; ordered, the weight
    gradient runs beside the decoder layers' backward. With the train state's
    per-layer buffers (`train.step.StateLayout`): a bench-tiny step 1.07x
    faster, bench-small 1.04x; either alone 1.00-1.03x (Zen 5).
    """
    return matmul(x, w)


def _dense_reverse_fwd(x, w):
    return matmul(x, w), (x, w)


def _dense_reverse_bwd(residuals, g):
    x, w = residuals
    g = g.reshape(-1, g.shape[-1])  # [N, O]
    dx = jnp.einsum("no,do->nd", g, w)  # [N, D]
    # g's first element plus 0 x dx's: a dependence the scheduler keeps (a barrier it would drop),
    # updated in place once the input gradient's matmul is done reading g
    first = jax.lax.slice(g, (0, 0), (1, 1)) + jax.lax.slice(dx, (0, 0), (1, 1)).astype(g.dtype) * 0
    g = jax.lax.dynamic_update_slice(g, first, (0, 0))
    return dx.reshape(x.shape), jnp.matmul(_rows_transposed(x), g).astype(w.dtype)


dense_reverse.defvjp(_dense_reverse_fwd, _dense_reverse_bwd)


def attention_mask(q_pos, k_pos, sliding_window: int | None, q_segment=None, k_segment=None):
    """Which keys each query sees: [B, T, S] bool.

    Causal by position; keys with position < 0 are empty or padding; with a
    sliding window W a query sees the W latest positions (itself included);
    with segment ids, only its own packed document.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if sliding_window is not None:
        mask &= q - k < sliding_window
    if q_segment is not None:
        mask &= q_segment[:, :, None] == k_segment[:, None, :]
    return mask


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings."""

    def __init__(self, embed: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 rope_theta: float, sliding_window: int | None, init_std: float,
                 param_dtype, dtype, rngs: nnx.Rngs):
        self.num_groups = num_heads // num_kv_heads
        self.rope_theta = rope_theta
        self.sliding_window = sliding_window
        self.dtype = dtype
        self.q = param(rngs, (embed, num_heads, head_dim), (EMBED, HEADS, HEAD_DIM), param_dtype, init_std)
        self.k = param(rngs, (embed, num_kv_heads, head_dim), (EMBED, KV_HEADS, HEAD_DIM), param_dtype, init_std)
        self.v = param(rngs, (embed, num_kv_heads, head_dim), (EMBED, KV_HEADS, HEAD_DIM), param_dtype, init_std)
        self.o = param(rngs, (num_heads, head_dim, embed), (HEADS, HEAD_DIM, EMBED), param_dtype, init_std)

    def __call__(self, x, positions, segment_ids=None, cache: KVCache | None = None, layer_index=0):
        """x: [B, T, D], positions: [B, T] -> ([B, T, D], the cache with these tokens added as
        layer `layer_index`'s)."""
        x = x.astype(self.dtype)
        q = matmul(x, self.q[...].astype(self.dtype))  # [B, T, N, H]
        k = matmul(x, self.k[...].astype(self.dtype))  # [B, T, K, H]
        v = matmul(x, self.v[...].astype(self.dtype))
        q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)

        if cache is None:
            keys, values, key_pos = _keys_layout(k), _values_layout(v), positions
            mask = attention_mask(positions, positions, self.sliding_window, segment_ids, segment_ids)
        else:
            if k.shape[1] > 1 and self.sliding_window is not None:
                # a chunk written first into a rolling cache could overwrite slots its own earlier
                # queries still see: attend to the old contents and the new tokens instead
                old = cache.layer(layer_index)
                keys = jnp.concatenate([old.k.astype(k.dtype), _keys_layout(k)], axis=-1)
                values = jnp.concatenate([old.v.astype(v.dtype), _values_layout(v)], axis=-2)
                key_pos = jnp.concatenate([old.pos, positions], axis=1)
                cache = cache.write(layer_index, k, v, positions)
            else:  # store the new tokens, then attend to the layer's cache alone
                cache = cache.write(layer_index, k, v, positions)
                keys, values, key_pos = cache.layer(layer_index)
                keys, values = keys.astype(k.dtype), values.astype(v.dtype)
            mask = attention_mask(positions, key_pos, self.sliding_window)

        h = q.shape[-1]
        q = rearrange(q, "b t (k g) h -> b t k g h", g=self.num_groups)
        # keys: [B, K, H, S], values: [B, K, S, H]. The cache's operand goes first, here and in
        # the weighted sum: XLA:CPU then reads it as stored
        scores = jnp.einsum("bkhs,btkgh->bkgts", keys, q).astype(jnp.float32) * h ** -0.5
        scores = jnp.where(mask[:, None, None], scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, K, G, T, S]
        out = rearrange(jnp.einsum("bksh,bkgts->btkgh", values, probs), "b t k g h -> b t (k g h)")
        # one contracted dim, not (n, h): with two, XLA:CPU may order them (h, n) to suit the
        # attention output's layout and then copies the whole weight to match, every decode step
        o = rearrange(self.o[...].astype(self.dtype), "n h d -> (n h) d")
        return matmul(out, o), cache
