"""mixtral_jax.sharding"""
