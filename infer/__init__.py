"""mixtral_jax.infer"""
