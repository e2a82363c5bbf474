"""Reading documents from files: text (one document per file) or JSONL (one per line); and
checking, before any work, that the paths outputs will go to are of the right kind."""

from __future__ import annotations

import json
import pathlib

from mixtral_jax.configtools import UserError

FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".npy": "tokens"}  # anything else: text


def file_format(path: pathlib.Path) -> str:
    """"jsonl", "tokens" or "text", by the file's suffix."""
    return FORMAT_BY_SUFFIX.get(path.suffix.lower(), "text")


def decode_utf8(data: bytes, source, first_line: int = 1) -> str:
    """`data` decoded as UTF-8; UserError naming `source` (a path, or e.g. "<stdin>") and the
    line of the first invalid byte (`data` starting at line `first_line`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise UserError(f"{source}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x})") from None


def read_text(path: pathlib.Path) -> str:
    """A text file's contents with newlines as `open()` reads them ("\\r\\n" and "\\r" -> "\\n");
    UserError naming the line of invalid UTF-8."""
    return decode_utf8(path.read_bytes(), path).replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: pathlib.Path, text_field: str) -> list[str]:
    """The `text_field` string of every non-blank line; UserError naming the line of a bad one."""
    texts = []
    with path.open("rb") as f:  # bytes, so that invalid UTF-8 is reported with its line
        for line_number, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, line_number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise UserError(f"{path}:{line_number}: not valid JSON (nested too deeply)") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_number}: a line must be a JSON object, got "
                                f"{type(row).__name__}")
            if not isinstance(row.get(text_field), str):
                raise UserError(f"{path}:{line_number}: no string field {text_field!r} (name the key "
                                f"holding the text: data.text_field in training, --text-field in eval)")
            texts.append(row[text_field])
    return texts


def read_texts(path: pathlib.Path, fmt: str, text_field: str) -> list[str]:
    """The documents of a "text" file (one) or a "jsonl" file (one per non-blank line)."""
    return read_jsonl(path, text_field) if fmt == "jsonl" else [read_text(path)]


def holds_text(texts: list[str]) -> bool:
    """Whether any of the documents has text other than whitespace (else: an empty data file)."""
    return any(text.strip() for text in texts)


def os_error_message(err: OSError) -> str:
    """An OSError as one line, "PATH: reason" (both paths of a two-path call), or its text."""
    paths = [str(name) for name in (err.filename, err.filename2) if name is not None]
    if not paths or not err.strerror:
        return str(err)
    return f"{' -> '.join(paths)}: {err.strerror}"


def _check_parents(path: pathlib.Path, option: str) -> None:
    """UserError if the nearest existing folder above `path` is not a folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a folder")
            return


def check_output_folder(path, option: str) -> pathlib.Path:
    """`path` as a Path, checked before any work is done: UserError if it, or a folder it
    would go in, exists and is not a folder. `option` names it in the message (e.g. "--to-hf")."""
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; name a folder")
    _check_parents(path, option)
    return path


def check_output_file(path, option: str) -> pathlib.Path:
    """`path` as a Path, checked before any work is done: UserError if it is a folder or cannot
    be opened for writing. Creates missing parent folders; touches no existing file's contents
    and leaves no new file behind. `option` names it in the message (e.g. "--output")."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; name a file")
    _check_parents(path, option)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as err:
        raise UserError(f"{option} {path} cannot be written ({os_error_message(err)})") from None
    return path
