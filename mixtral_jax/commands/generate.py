"""`mixtral-jax generate`: text from a checkpoint, streamed to the terminal.

    mixtral-jax generate --checkpoint runs/demo --prompt "Once upon a time" max_new_tokens=64 temperature=0.8
    mixtral-jax generate --checkpoint converted/8x7b-instruct --chat mesh.expert=8

Text appears as it is produced: the decode loop runs in segments of a few
tokens and the host prints each segment's text. In --chat every turn re-encodes
the whole conversation in the instruct format (the cache is not kept between turns).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time


def add_arguments(parser):
    """Adds `mixtral-jax generate`'s options to `parser`."""
    from mixtral_jax.infer import runtime

    runtime.add_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text")
    what.add_argument("--chat", action="store_true", help="an interactive conversation (instruct models)")
    parser.add_argument("--system", default=None, help="--chat: a system prompt")


def run(args):
    """Runs `mixtral-jax generate` with the parsed `args`."""
    from mixtral_jax.configtools import UserError
    from mixtral_jax.documents import decode_utf8
    from mixtral_jax.infer import runtime
    from mixtral_jax.infer.generate import Generator, Request, require_chat_format

    if args.system is not None and not args.chat:  # --prompt is plain text, not a chat turn
        raise UserError("--system only applies with --chat")
    if args.prompt is not None:  # argv's undecodable bytes arrive as surrogates: decoded strictly
        args.prompt = decode_utf8(os.fsencode(args.prompt), "--prompt")
    config, mesh, model, tokenizer = runtime.open_checkpoint(args)
    generator = Generator(model, tokenizer, mesh=mesh, chunk=8)
    settings = Request((), config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                       config.seed, tuple(config.stop))
    generator.check_settings(settings)  # before the first --chat turn is typed

    def complete(ids) -> str:
        request = dataclasses.replace(settings, prompt=ids)
        start = time.perf_counter()
        (result,) = generator.run([request], on_text=lambda _, text: print(text, end="", flush=True))
        seconds = time.perf_counter() - start
        print(flush=True)
        print(f"[{len(result.tokens)} tokens, {len(result.tokens) / seconds:.1f} tokens/s, "
              f"finish: {result.finish_reason}]", file=sys.stderr)
        return result.text

    if args.chat:
        require_chat_format(tokenizer)
        _chat(lambda messages: complete(tokenizer.encode_chat(messages)), args.system)
    else:
        complete(tokenizer.encode(args.prompt))
    return 0


def _chat(reply_to, system: str | None) -> None:
    """The --chat loop: reads turns from stdin until an empty line or EOF; `reply_to(messages)`
    streams and returns the assistant's answer to the conversation so far."""
    from mixtral_jax.configtools import UserError

    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    print("chat: an empty line or Ctrl-D ends, /reset starts over", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            messages = list(opening)
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = reply_to(messages)
        except UserError as err:  # e.g. the conversation outgrew the context: the session goes on
            messages.pop()
            print(f"error: {err} (/reset starts over)", file=sys.stderr)
            continue
        if reply.strip():
            messages.append({"role": "assistant", "content": reply})
        else:  # an empty answer cannot be a turn of the conversation
            messages.pop()
