"""The Mixtral decoder: embedding, a scanned stack of (attention, MoE) layers,
final norm and an untied LM head."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import MixtralConfig, preset
from mixtral_jax.configtools import is_integer
from mixtral_jax.layers import (EMBED, LAYERS, VOCAB, Attention, KVCache, RMSNorm, constrain, dense, dense_reverse,
                                param)
from mixtral_jax.moe import MoE, MoEAux, ExpertsFn, experts_fn_for, load_balancing_loss, router_z_loss

ACTIVATION = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]
_REMAT = {"full": None, "dots": jax.checkpoint_policies.dots_saveable}


def _check_token_ids(tokens, vocab_size: int) -> None:
    """ValueError for an id outside [0, vocab_size) when the ids are known here (an eager call):
    the embedding lookup would clamp it silently. Traced ids (under jit) go unchecked."""
    if isinstance(tokens, jax.core.Tracer) or not getattr(tokens, "is_fully_addressable", True):
        return
    ids = np.asarray(tokens)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {bad.flat[0]} is outside the vocabulary [0, {vocab_size})")


def _check_cache(cache: KVCache, shape: tuple[int, int], sliding_window: int | None) -> None:
    """ValueError when tokens of `shape` [B, T] cannot go into `cache` (its batch differs, or a
    full cache has fewer slots than T): the writes would land on the wrong rows or slots."""
    batch, slots = cache.pos[0].shape  # layer 0's positions [B, S], stacked or per layer
    if shape[0] != batch:
        raise ValueError(f"tokens have {shape[0]} rows but the cache holds {batch}")
    if sliding_window is None and shape[1] > slots:
        raise ValueError(f"{shape[1]} tokens do not fit the cache's {slots} slots")


class ModelOutput(NamedTuple):
    """What `Mixtral.forward` returns."""

    logits: jax.Array  # [B, T, V] float32
    aux: MoEAux  # router statistics, each field stacked over layers: [L, ...]
    cache: KVCache | None  # the cache with these tokens added


class DecoderLayer(nnx.Module):
    """Pre-norm attention then pre-norm sparse MoE, each with a residual."""

    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        c = config
        dtypes = dict(param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **dtypes)
        self.attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_size,
                              rope_theta=c.rope_theta, sliding_window=c.sliding_window,
                              init_std=c.initializer_range, dtype=jnp.dtype(c.dtype), **dtypes)
        self.moe_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **dtypes)
        self.moe = MoE(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok,
                       init_std=c.initializer_range, dtype=jnp.dtype(c.dtype), **dtypes)

    def __call__(self, x, positions, segment_ids, token_mask, cache, index, experts_fn):
        """x [B, T, D] -> (x [B, T, D], this layer's MoEAux, the cache with layer `index`'s
        keys and values added). positions, segment_ids, token_mask: [B, T]."""
        attn_out, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, index)
        x = x + attn_out.astype(x.dtype)
        moe_out, aux = self.moe(self.moe_norm(x), experts_fn, token_mask)
        return constrain(x + moe_out.astype(x.dtype), ACTIVATION), aux, cache


class Mixtral(nnx.Module):
    """The Mixtral causal language model. `model(tokens)` maps int32 [B, T] to float32 logits [B, T, V]."""

    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdtype = jnp.dtype(config.param_dtype)
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), (VOCAB, EMBED), pdtype,
                           config.initializer_range)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def make_layers(layer_rngs):
            return DecoderLayer(config, rngs=layer_rngs)

        self.layers = make_layers(rngs)  # every parameter stacked: [L, ...]
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=pdtype, rngs=rngs)
        self.lm_head = param(rngs, (config.hidden_size, config.vocab_size), (EMBED, VOCAB), pdtype,
                             config.initializer_range)

    def __call__(self, tokens):
        return self.forward(tokens).logits

    def forward(self, tokens, positions=None, *, segment_ids=None, token_mask=None,
                cache: KVCache | None = None, experts_fn: ExpertsFn | None = None,
                last_only: bool = False, unroll_layers: bool = False, reverse_only: bool = False) -> ModelOutput:
        """The full forward pass.

        tokens: [B, T] int32. positions: [B, T] (default 0..T-1; -1 marks left
        padding). segment_ids: [B, T] packed-document ids (attention stays within
        a document). token_mask: [B, T], 1 where a token counts in the router
        statistics. cache: KVCache [L, ...] to attend to and extend (in its
        `per_layer()` form the layers run as a Python loop).
        experts_fn: the expert compute path (default: the config's `moe_impl`;
        `mixtral_jax.sharding` passes the expert-parallel one). last_only: logits
        of the last position only, [B, 1, V] (a prefill needs no more).
        unroll_layers: the layer loop unrolled (static per-layer slices, which XLA
        can forward from per-layer buffers: decoding on CPU copies no weights).
        reverse_only: differentiated in reverse mode only (a training loss): the LM
        head is then `dense_reverse`, its backward's two matmuls ordered.
        """
        with jax.default_matmul_precision(self.config.matmul_precision):  # read when the dots are traced
            return self._forward(tokens, positions, segment_ids, token_mask, cache, experts_fn, last_only,
                                 unroll_layers, reverse_only)

    def _forward(self, tokens, positions, segment_ids, token_mask, cache, experts_fn, last_only, unroll_layers,
                 reverse_only):
        config = self.config
        if isinstance(tokens, str):
            raise ValueError("tokens are integer ids [batch, seq]: encode text with a tokenizer first")
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or 0 in tokens.shape:
            raise ValueError(f"tokens must be integer ids [batch, seq] with batch, seq >= 1, got {tokens.dtype} "
                             f"{list(tokens.shape)}")
        positions, segment_ids, token_mask = (None if a is None else jnp.asarray(a)
                                              for a in (positions, segment_ids, token_mask))
        for name, array in (("positions", positions), ("segment_ids", segment_ids), ("token_mask", token_mask)):
            if array is not None and array.shape != tokens.shape:
                raise ValueError(f"{name} must have the tokens' shape {list(tokens.shape)}, got {list(array.shape)}")
        _check_token_ids(tokens, config.vocab_size)
        if cache is not None:
            _check_cache(cache, tokens.shape, config.sliding_window)
        dtype = jnp.dtype(config.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if token_mask is None:
            token_mask = (positions >= 0).astype(jnp.float32)
        experts_fn = experts_fn or experts_fn_for(config.moe_impl)

        x = constrain(self.embed[...].astype(dtype)[tokens], ACTIVATION)  # [B, T, D]
        graphdef, layer_state = nnx.split(self.layers)

        def layer_step(carry, scanned):
            x, cache = carry  # the whole cache rides in the carry: each layer updates its slice in place
            state, index = scanned
            layer = nnx.merge(graphdef, state)
            x, aux, cache = layer(x, positions, segment_ids, token_mask, cache, index, experts_fn)
            return (x, cache), aux

        if cache is not None and isinstance(cache.k, tuple):  # per-layer buffers: a Python loop
            auxes = []
            for index in range(config.num_hidden_layers):
                (x, cache), aux = layer_step((x, cache), (jax.tree.map(lambda a: a[index], layer_state), index))
                auxes.append(aux)
            aux = jax.tree.map(lambda *layers: jnp.stack(layers), *auxes)
        else:
            if config.remat != "none":
                layer_step = jax.checkpoint(layer_step, policy=_REMAT[config.remat], prevent_cse=False)
            layer_index = jnp.arange(config.num_hidden_layers)
            (x, cache), aux = jax.lax.scan(layer_step, (x, cache), (layer_state, layer_index),
                                           unroll=unroll_layers)
        x = self.norm(x[:, -1:] if last_only else x)
        head = dense_reverse if reverse_only else dense
        logits = head(x, self.lm_head[...].astype(dtype)).astype(jnp.float32)  # [B, T, V]
        return ModelOutput(logits, aux, cache)

    def aux_loss(self, aux: MoEAux):
        """router_aux_loss_coef x load balancing + router_z_loss_coef x z-loss."""
        config = self.config
        loss = config.router_aux_loss_coef * load_balancing_loss(aux, config.aux_loss_style)
        if config.router_z_loss_coef:
            loss = loss + config.router_z_loss_coef * router_z_loss(aux)
        return loss

    def init_cache(self, batch: int, size: int, dtype=None) -> KVCache:
        """An empty cache of `size` slots per row for every layer (`KVCache`: keys [L, B, K, H, S],
        values [L, B, K, S, H])."""
        for name, value in (("batch", batch), ("size", size)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"init_cache's {name} must be a positive integer, got {value!r}")
        c = self.config
        return KVCache.empty(c.num_hidden_layers, batch, size, c.num_key_value_heads, c.head_size,
                             dtype or jnp.dtype(c.dtype))


def token_nll(logits, targets):
    """Negative log-likelihood of each target: logits [B, T, V] float32, targets [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def init(config: MixtralConfig | str, seed: int = 0) -> Mixtral:
    """A freshly initialised model (parameters N(0, initializer_range), norms 1) of `config`, or of
    the preset it names; seed: an integer in [0, 2**32) (numpy's too)."""
    if isinstance(config, str):
        config = preset(config)
    if not isinstance(config, MixtralConfig):
        raise TypeError(f"init takes a MixtralConfig or a preset name, got {type(config).__name__}")
    if not is_integer(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")  # larger ones repeat
    return Mixtral(config, rngs=nnx.Rngs(int(seed)))
