"""The `mixtral-jax` console script: one subcommand per module in `mixtral_jax.commands`.

Only the chosen subcommand's module is imported, so `mixtral-jax --help`
answers instantly. A `UserError` (or a config error) becomes one line on
stderr and exit status 2, and so does an `OSError` that escapes a command (a
path of the wrong kind, no permission, a full disk: "error: PATH: reason");
anything else is a bug and keeps its traceback. A setting typed as an
option (`--max-new-tokens 20`) is answered with the KEY=VALUE word it takes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "pretrain or continue training a model from a run config",
    "generate": "generate text from a checkpoint (a prompt, or --chat)",
    "batch": "batch offline inference over a JSONL file of prompts",
    "eval": "perplexity and per-document log-likelihoods over a text or JSONL file",
    "convert": "convert between Hugging Face safetensors and mixtral-jax checkpoints",
    "info": "parameter counts and FLOPs per token of a preset",
    "plan": "compile a training step for a mesh ahead of time and report per-device memory",
    "bench": "speed benchmarks that print JSON (moe, compile, train, decode, batch)",
    "tokenizer": "encode, decode, or train a SentencePiece tokenizer",
}


def _module(command: str):
    return importlib.import_module(f"mixtral_jax.commands.{command}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s subparser is filled in (imports stay lazy)."""
    parser = argparse.ArgumentParser(prog="mixtral-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module(name).add_arguments(subparser)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--config NAME_OR_PATH and trailing dotted key=value overrides of a training run config."""
    parser.add_argument("--config", default=default,
                        help="YAML run config: a path, or a name from configs/ (e.g. tiny)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.steps=3 mesh.expert=8")
    parser.set_defaults(settings="mixtral_jax.train.config:RunConfig")


def _as_setting(args, option: str, argv: list[str]) -> str | None:
    """The KEY=VALUE word(s) for `option`, an option argparse does not know (`--steps 3` ->
    "train.steps=3", `--dtype bfloat16` -> "model.dtype=bfloat16"), when the command's
    settings (`args.settings`, "module:Class", set by its parser) or their `model` section
    (MixtralConfig's fields) have a field so named; else None."""
    if not getattr(args, "settings", None):
        return None
    name, _, value = option[2:].partition("=")
    following = argv[argv.index(option) + 1:][:1]
    if not value and following and not following[0].startswith("-") and "=" not in following[0]:
        value = following[0]
    from mixtral_jax.config import MixtralConfig
    from mixtral_jax.configtools import field_paths

    module, _, cls = args.settings.partition(":")
    settings, key = getattr(importlib.import_module(module), cls), name.replace("-", "_")
    paths = field_paths(settings, key) or field_paths(MixtralConfig, key, "model.")  # every settings class has `model`
    return " or ".join(f"{path}={value or 'VALUE'}" for path in paths) or None


def _on_huge_pages(args) -> bool:
    """Whether the command restarts its process with malloc on huge pages
    (`allocator.restart_with_huge_pages`): those that run the model, and their benchmarks."""
    return args.command in ("train", "generate", "batch", "eval") or (
        args.command == "bench" and args.bench in ("train", "decode", "batch"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. As the script itself (argv None), a command that
    runs the model first restarts the process with malloc on huge pages (`_on_huge_pages`);
    called with argv (tests, your code), it never restarts."""
    from mixtral_jax.config import ConfigError
    from mixtral_jax.configtools import UserError
    from mixtral_jax.documents import os_error_message

    console = argv is None  # the console script's own process, which may start over
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value settings on both sides of an option: argparse takes only the first run
        option = next((item for item in extra if item.startswith("--") and len(item) > 2), None)
        if option and (setting := _as_setting(args, option, argv)):
            print(f"mixtral-jax {args.command}: error: {option} is not an option; settings are KEY=VALUE "
                  f"words: {setting}", file=sys.stderr)
            return 2
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.parse_args(argv)  # exits with argparse's own message for what it does not know
        args.overrides = [*args.overrides, *extra]
    if console and _on_huge_pages(args):
        from mixtral_jax.allocator import restart_with_huge_pages

        restart_with_huge_pages()
    try:
        return _module(args.command).run(args) or 0
    except (UserError, ConfigError, OSError) as err:
        message = os_error_message(err) if isinstance(err, OSError) else str(err)
        print(f"mixtral-jax {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixtral-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
