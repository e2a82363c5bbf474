"""Reading documents from files: text (one document per file) or JSONL (one per line)."""

from __future__ import annotations

import json
import pathlib

from mixtral_jax.configtools import UserError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".npy": "tokens"}  # anything else: text


def file_format(path: pathlib.Path) -> str:
    """"jsonl", "tokens" or "text", by the file's suffix."""
    return FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text")


def read_jsonl(path: pathlib.Path, text_field: str) -> list[str]:
    """The `text_field` string of every non-blank line; UserError naming the line of a bad one."""
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise UserError(f"{path}:{line_number}: no string field {text_field!r} (name the key "
                                f"holding the text: data.text_field in training, --text-field in eval)")
            texts.append(row[text_field])
    return texts
