"""Speed benchmarks behind `mixtral-jax bench ...`; each prints one JSON object."""
