"""Grouped SwiGLU over expert-sorted rows for CPU (placeholder: ragged_dot until the blocked kernel lands)."""

from mixtral_jax.moe import ragged_ffn as grouped_ffn  # noqa: F401
