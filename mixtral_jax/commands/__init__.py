"""One module per `mixtral-jax` subcommand: `add_arguments(parser)` and `run(args)`."""
