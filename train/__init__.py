"""mixtral_jax.train"""
