"""`mixtral-jax tokenizer {encode,decode,train}`: inspect a SentencePiece model or train a new one."""

from __future__ import annotations

import json
import os
import sys


def add_arguments(parser):
    """Adds `mixtral-jax tokenizer`'s options to `parser`."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    model_help = "mistral-v1 (default, Mixtral 8x7B), mistral-v3 (8x22B), or a .model path"

    encode = sub.add_parser("encode", help="text -> token ids", description="text -> token ids")
    encode.add_argument("--text", required=True, help="the text ('-' reads stdin)")
    encode.add_argument("--model", default=None, help=model_help)
    encode.add_argument("--chat", action="store_true",
                        help="encode the text as one user turn in the instruct chat format")
    encode.add_argument("--system", default=None, help="with --chat: a system prompt")
    encode.add_argument("--no-bos", action="store_true", help="do not prepend <s>")
    encode.add_argument("--eos", action="store_true", help="append </s>")
    encode.add_argument("--json", action="store_true", help="print ids and pieces as JSON")

    decode = sub.add_parser("decode", help="token ids -> text", description="token ids -> text")
    decode.add_argument("--ids", type=int, nargs="+", required=True, help="token ids, e.g. 1 22557")
    decode.add_argument("--model", default=None, help=model_help)
    decode.add_argument("--json", action="store_true", help="print the text as JSON")

    train = sub.add_parser("train", help="train a BPE model with Mixtral's special-token layout",
                           description="train a BPE SentencePiece model with Mixtral's settings "
                                       "(unk 0, bos 1, eos 2, byte fallback, digits split)")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="text files, one sentence or document per line")
    train.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 32000")
    train.add_argument("--out", required=True, help="the .model file to write")
    train.add_argument("--max-sentences", type=int, default=10_000_000,
                       help="lines sampled from the inputs for training")


def run(args):
    """Runs `mixtral-jax tokenizer` with the parsed `args`."""
    from mixtral_jax import tokenizer
    from mixtral_jax.configtools import UserError
    from mixtral_jax.documents import check_output_file, decode_utf8

    if getattr(args, "system", None) is not None and not args.chat:
        raise UserError("--system only applies with --chat")
    if args.action == "train":
        check_output_file(args.out, "--out")  # before training: writing is its last step
        trained = tokenizer.train(args.input, args.vocab_size, args.out, args.max_sentences)
        print(json.dumps({"out": str(trained.path), "vocab_size": trained.vocab_size,
                          "bos_id": trained.bos_id, "eos_id": trained.eos_id}))
        return 0
    tok = tokenizer.Tokenizer(args.model)
    if args.action == "decode":
        text = tok.decode(args.ids)
        print(json.dumps({"text": text}, ensure_ascii=False) if args.json else text)
        return 0
    if args.text == "-":  # bytes, so that invalid UTF-8 is one clear error
        text = decode_utf8(sys.stdin.buffer.read(), "<stdin>")
    else:  # undecodable bytes in argv arrive as surrogates: back to bytes, then decoded strictly
        text = decode_utf8(os.fsencode(args.text), "--text")
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        ids = tok.encode_chat([*system, {"role": "user", "content": text}])
    else:
        ids = tok.encode(text, bos=not args.no_bos, eos=args.eos)
    if args.json:
        pieces = [tok.processor.IdToPiece(i) for i in ids]
        print(json.dumps({"ids": ids, "pieces": pieces, "count": len(ids)}, ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0
