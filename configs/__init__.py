"""Run configs (YAML) bundled with mixtral-jax: model presets, run and bench configs."""
