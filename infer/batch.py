"""Batch offline inference over a JSONL file, resumable, losing no row.

Input: one JSON object per line with an `id` (string or integer) and either
`prompt` (a string) or `messages` (a conversation), and optionally its own
`max_new_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop` (other keys
are ignored, e.g. metadata, except near-misses of these names such as
`tempreature`, which are errors). Blank lines are skipped.

Output: one JSON object per input line, in completion order:
    {"id", "line", "text", "prompt_tokens", "completion_tokens", "finish_reason"}
or  {"id", "line", "error"} for a line that cannot run (bad JSON or UTF-8, a
missing, mistyped or out-of-range field (the rules of `Generator.check`, which
`generate` applies too: 0 <= seed < 2**32, finite temperature and top_p, no
empty stop string), a prompt longer than the context, a duplicate id: the
first line with an id runs, later ones are errors). `line` is the 1-based
input line; `id` is null when the line has none.

Nothing is lost: error records are written first, then the records of the
rows that finish, in one write each time some do, flushed and fsynced. A job
restarted with the same command reads the output, drops a torn last line, and
skips the lines already there, so a killed job finishes with every line
exactly once. Lines are matched by number: with `retry_errors`, a rerun takes
the error records out of the output and runs their lines again (fixed in
the input, say), leaving the other records as they were.

Throughput: rows are sorted by prompt length and run through a batch of
`batch_size` rows in which a row that finishes takes the next
(`Generator.run_continuous`), one batch per prompt-length bucket; per-row
sampling settings ride along as per-row arrays, so a batch mixes them.
A row's random stream depends only on its seed (default: the job seed mixed
with its id), not on its batch, so a restarted job samples the same text.

Many hosts: process i of n takes the lines with (line - 1) % n == i and
writes `OUTPUT.part-<i>-of-<n>`; each process runs its own model replica on
its local devices (mesh.* sizes a per-process mesh). Concatenate the parts
when all have finished.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pathlib
import time
import zlib
from collections.abc import Iterator

from mixtral_jax.configtools import UserError
from mixtral_jax.infer.generate import MIN_PROMPT_BUCKET, Generator, Request, bucket, require_chat_format

SETTINGS = {"max_new_tokens": int, "temperature": (int, float), "top_k": int, "top_p": (int, float),
            "seed": int}


@dataclasses.dataclass
class Row:
    """One input line that parsed: its request, or the error to record."""

    line: int
    id: str | int | None
    request: Request | None = None
    error: str | None = None


def part_path(output: str | os.PathLike, process_index: int, process_count: int) -> pathlib.Path:
    """The file this process writes: OUTPUT itself, or OUTPUT.part-<i>-of-<n> on many processes."""
    output = pathlib.Path(output).expanduser()
    if process_count == 1:
        return output
    return output.with_name(f"{output.name}.part-{process_index}-of-{process_count}")


RECORD_START = b'{"id": '  # how every record this job writes begins (`_append`)


def finished_lines(path: pathlib.Path, retry_errors: bool = False) -> set[int]:
    """Input lines already in the output (blank lines skipped). A torn last line (a killed
    write) is cut off the file, but only once every whole line has read as a record of this
    job and the torn one begins like one: any other file is refused untouched. With
    `retry_errors`, error records are taken out of the file (rewritten whole, then renamed
    over it), so their lines run again."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    records = []  # (the line as written, its record, its input line) of every whole line
    for number, raw in enumerate(data[:keep].splitlines(), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            records.append((raw, record, int(record["line"])))
        except (ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{path}:{number}: not a record of this job; use another --output") from None
    torn = data[keep:]
    if torn and not _cut_record(torn):
        raise UserError(f"{path}: its last line is not a record of this job; use another --output")
    if retry_errors and any("error" in record for _, record, _ in records):
        records = [(raw, record, line) for raw, record, line in records if "error" not in record]
        _replace(path, b"".join(raw + b"\n" for raw, _, _ in records))
    elif torn:
        with path.open("r+b") as f:
            f.truncate(keep)
    return {line for _, _, line in records}


def _replace(path: pathlib.Path, data: bytes) -> None:
    """Puts `data` in `path` through a durable temporary file and a rename: a kill leaves the
    old contents or the new, never a mix."""
    temporary = path.with_name(path.name + ".rewrite")
    with temporary.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _cut_record(tail: bytes) -> bool:
    """Whether `tail`, a last line without its newline, is a record a kill cut short."""
    try:
        whole = json.loads(tail)  # all there but the newline
    except (ValueError, RecursionError):  # cut inside: it must begin as every record does
        return tail.startswith(RECORD_START) or RECORD_START.startswith(tail)
    return isinstance(whole, dict) and "line" in whole


def read_rows(path: str | os.PathLike, defaults, generator: Generator) -> Iterator[Row]:
    """Every non-blank input line as a `Row` (duplicate ids become errors), encoded with the
    generator's tokenizer and checked by its rules."""
    first_line: dict[str, int] = {}
    try:
        f = open(pathlib.Path(path).expanduser(), "rb")
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row = _parse(raw, number, defaults, generator)
            if row.id is not None:
                key = json.dumps(row.id)
                if key in first_line:
                    row = Row(number, row.id, error=f"duplicate id (first on line {first_line[key]})")
                else:
                    first_line[key] = number
            yield row


def _parse(raw: bytes, number: int, defaults, generator: Generator) -> Row:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        return Row(number, _id_of(raw.decode("utf-8", "replace")), error=f"invalid UTF-8 at byte {err.start}")
    if number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return Row(number, None, error=f"not valid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return Row(number, None, error="not valid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return Row(number, None, error="a row must be a JSON object (the input is JSONL: one object per line)")
    row_id = obj.get("id")
    if row_id is None:
        return Row(number, None, error="missing id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return Row(number, None, error=f"id must be a string or an integer, got {row_id!r}")
    try:
        return Row(number, row_id, request=_request(obj, defaults, generator))
    except UserError as err:
        return Row(number, row_id, error=str(err))


def _id_of(text: str):
    try:
        row_id = json.loads(text).get("id")
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return None
    return row_id if isinstance(row_id, (str, int)) and not isinstance(row_id, bool) else None


ROW_KEYS = ("id", "prompt", "messages", *SETTINGS, "stop")


def _check_spelling(obj: dict) -> None:
    """UserError for a key that looks like a misspelt setting (it would be ignored silently)."""
    for key in obj:
        if key not in ROW_KEYS and (near := difflib.get_close_matches(key, ROW_KEYS, n=1, cutoff=0.8)):
            raise UserError(f"unknown key {key!r} (did you mean {near[0]!r}?)")


def _request(obj: dict, defaults, generator: Generator) -> Request:
    _check_spelling(obj)
    tokenizer = generator.tokenizer
    if ("prompt" in obj) == ("messages" in obj):
        raise UserError("a row needs exactly one of 'prompt' or 'messages'")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise UserError(f"prompt must be a string, got {type(obj['prompt']).__name__}")
        ids = tokenizer.encode(obj["prompt"])
    else:
        require_chat_format(tokenizer)
        ids = tokenizer.encode_chat(obj["messages"])
    settings = {}
    for key, kind in SETTINGS.items():
        value = obj.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UserError(f"{key} must be a number{' (integer)' if kind is int else ''}, got {value!r}")
        settings[key] = value
    if "seed" not in obj:  # the row's own stream: independent of batching and restarts
        settings["seed"] = zlib.crc32(json.dumps([defaults.seed, obj["id"]]).encode())
    stop = obj.get("stop", defaults.stop)
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list):
        raise UserError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    request = Request(ids, stop=tuple(stop), **settings)
    generator.check(request)  # the rules `generate` applies too: settings' ranges, non-empty stop strings
    return request


def run_job(generator: Generator, input_path, output_path, defaults, *, batch_size: int,
            process_index: int = 0, process_count: int = 1, progress: bool = True,
            retry_errors: bool = False) -> dict:
    """Runs (or finishes) a batch job; returns counts of what this run wrote. retry_errors: run
    again the lines whose records are errors (e.g. after fixing them in the input)."""
    from tqdm import tqdm

    out_path = part_path(output_path, process_index, process_count)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = finished_lines(out_path, retry_errors)
    rows = [r for r in read_rows(input_path, defaults, generator)
            if (r.line - 1) % process_count == process_index and r.line not in done]
    errors = [r for r in rows if r.error is not None]
    pending = sorted((r for r in rows if r.error is None), key=lambda r: len(r.request.prompt))
    counts = {"output": str(out_path), "skipped": len(done), "errors": len(errors), "completed": 0,
              "prompt_tokens": 0, "completion_tokens": 0}
    with out_path.open("ab") as out:
        _append(out, [{"id": r.id, "line": r.line, "error": r.error} for r in errors])
        bar = tqdm(total=len(pending), unit="row", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()
        for group in _by_prompt_bucket(pending):
            for finished in generator.run_continuous([r.request for r in group], batch_size):
                _append(out, [{"id": group[i].id, "line": group[i].line, "text": c.text,
                               "prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                               "finish_reason": c.finish_reason} for i, c in finished])
                counts["completed"] += len(finished)
                counts["prompt_tokens"] += sum(c.prompt_tokens for _, c in finished)
                counts["completion_tokens"] += sum(len(c.tokens) for _, c in finished)
                rate = counts["completion_tokens"] / (time.perf_counter() - start)
                bar.set_postfix_str(f"{rate:.1f} tokens/s", refresh=False)
                bar.update(len(finished))
        bar.close()
    return counts


def _by_prompt_bucket(rows: list[Row]) -> list[list[Row]]:
    """`rows` (sorted by prompt length) split where the prompt length bucket changes: each
    group runs through one continuous batch whose cache fits its longest prompt."""
    groups: dict[int, list[Row]] = {}
    for row in rows:
        groups.setdefault(bucket(len(row.request.prompt), MIN_PROMPT_BUCKET), []).append(row)
    return list(groups.values())


def _append(out, records: list[dict]) -> None:
    """Writes whole records at once and makes them durable before the job moves on."""
    if not records:
        return
    out.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    out.flush()
    os.fsync(out.fileno())
