"""Generation from Python: prompts in, completions out.

    results = generate(model, ["Once upon a time"], tokenizer, max_new_tokens=64, temperature=0.8)
    results[0].text, results[0].tokens, results[0].finish_reason

Prompts are left-padded into a batch whose sizes are bucketed to powers of
two (batch rows, prompt length, new-token buffer), so a long job compiles a
few programs. The decode loop is one `jax.lax.while_loop`; with stop strings
or a streaming callback it runs in segments of `chunk` tokens, and between
segments the host decodes the new tokens (`Tokenizer.stream`), streams them,
and finds stop strings, marking those rows done on the device. The tokens of
a stopped row end with the token that completed the stop string; its text
ends just before the stop string. EOS tokens are kept in `.tokens`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.configtools import UserError, is_integer
from mixtral_jax.infer import decode as programs
from mixtral_jax.infer.decode import bucket
from mixtral_jax.infer.sampling import SEED_LIMIT, check_seeds, make_sampler, row_keys

MIN_PROMPT_BUCKET = 16
MIN_BUFFER_BUCKET = 16
DEFAULT_CHUNK = 16


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) and its own settings."""

    prompt: Sequence[int]
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Completion:
    """The result for one prompt."""

    tokens: list[int]  # the new token ids (an EOS that ended the row included)
    text: str | None  # their text, when a tokenizer is known (stop string cut off)
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: int


class Batch(NamedTuple):
    """A batch of requests as device inputs."""

    tokens: jax.Array  # [B, T] int32, left-padded
    positions: jax.Array  # [B, T] int32, -1 on padding
    rows: programs.Rows
    sampler: object  # a `sampling` strategy
    buffer: int  # new-token slots N


def batch_rows(count: int, multiple: int) -> int:
    """Rows of a batch of `count` items: a power of two, rounded up to a multiple of `multiple`
    (the mesh's batch devices), so a long job compiles few batch shapes."""
    size = bucket(count, 1)
    return size + -size % multiple


def prompt_ids(prompt, tokenizer) -> list[int]:
    """Token ids of a prompt: a string, a conversation (list of role/content dicts) or ids (a
    list, or a 1-D integer numpy or JAX array)."""
    if isinstance(prompt, (bytes, bytearray)):
        raise UserError(f"a prompt of bytes: decode it to a string first, got {prompt!r:.60}")
    if isinstance(prompt, jax.Array):
        prompt = np.asarray(prompt)
    if isinstance(prompt, np.ndarray) and (prompt.ndim != 1 or prompt.dtype.kind not in "iu"):
        raise UserError(f"an array prompt holds token ids: 1-D integers, got {prompt.dtype} {prompt.shape}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise UserError("a text prompt needs a tokenizer (or pass token ids)")
        return tokenizer.encode(prompt)
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        if tokenizer is None:
            raise UserError("a conversation prompt needs a tokenizer")
        require_chat_format(tokenizer)
        return tokenizer.encode_chat(prompt)
    if isinstance(prompt, (Sequence, np.ndarray)) and all(
            is_integer(t) for t in prompt):
        return [int(t) for t in prompt]
    raise UserError(f"a prompt must be a string, a list of messages or a list of token ids, got {prompt!r:.80}")


def require_chat_format(tokenizer) -> None:
    """UserError, naming the tokenizer, unless it has an instruct chat format (`encode_chat`)."""
    if hasattr(tokenizer, "encode_chat"):
        return
    name = getattr(tokenizer, "name", None) or getattr(tokenizer, "path", None)
    if name == "bytes":
        what = "the byte tokenizer"
    else:
        what = f"tokenizer {name!r}" if name else f"the {type(tokenizer).__name__} tokenizer"
    raise UserError(f"{what} has no chat format (conversations need an instruct model's tokenizer)")


def generate(model, prompts: Sequence, tokenizer=None, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop: Sequence[str] = (), batch_size: int | None = None, mesh=None,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Completions of `prompts` (strings, conversations, or token id lists), one per prompt.

    temperature 0 is greedy; top_k 0 and top_p 1.0 are off. Prompt i samples
    with seed + i (mod 2**32): the same call with the same seed gives the same
    text. `stop`: a string or strings that end a row (needs a tokenizer).
    `batch_size`: rows decoded together (default: all prompts at once); with more
    prompts than that, a row that finishes takes the next prompt
    (`Generator.run_continuous`), except while `on_text` streams (then batch by batch).
    `mesh`: a `mixtral_jax.sharding` mesh the model is sharded on.
    `on_text(index, text)`: called with each prompt's new text as it is produced.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        prompts = list(np.asarray(prompts))  # rows of token ids
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)):
        raise UserError("`prompts` is a list of prompts: wrap a single prompt in a list")
    if not isinstance(prompts, (list, tuple)):
        raise UserError(f"`prompts` is a list of prompts (strings, conversations or token id lists), "
                        f"got {type(prompts).__name__}")
    if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
        raise UserError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if isinstance(tokenizer, str):  # a name (or .model path), as config.tokenizer takes
        from mixtral_jax.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model.config, tokenizer)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if isinstance(max_new_tokens, np.integer):
        max_new_tokens = int(max_new_tokens)
    try:
        first = int(check_seeds([seed])[0])
    except ValueError as err:
        raise UserError(str(err)) from None
    requests = [Request(prompt_ids(p, tokenizer), max_new_tokens, temperature, top_k, top_p,
                        (first + i) % SEED_LIMIT, stop) for i, p in enumerate(prompts)]
    generator = Generator(model, tokenizer, mesh=mesh)
    size = batch_size or max(len(requests), 1)
    if on_text is None and len(requests) > size:  # a row that finishes takes the next prompt
        done = dict(pair for finished in generator.run_continuous(requests, size) for pair in finished)
        return [done[index] for index in range(len(requests))]
    results = []
    for start in range(0, len(requests), size):
        callback = None if on_text is None else (lambda i, text, s=start: on_text(s + i, text))
        results += generator.run(requests[start:start + size], on_text=callback)
    return results


class Generator:
    """Runs batches of `Request`s through the prefill and decode programs of one model."""

    def __init__(self, model, tokenizer=None, *, mesh=None, chunk: int = DEFAULT_CHUNK,
                 eos_ids: Sequence[int] | None = None):
        """`eos_ids`: tokens that end a row (default: the config's and the tokenizer's EOS).
        `chunk`: decode steps between host checks when streaming or matching stop strings."""
        self.config = model.config
        pieces = getattr(tokenizer, "vocab_size", 0)  # a tokenizer of your own need not say
        if pieces > self.config.vocab_size:
            raise UserError(f"the tokenizer has {pieces} pieces but the model's vocabulary "
                            f"{self.config.vocab_size}: its ids would not fit the embedding")
        self.graphdef, self.params = nnx.split(model)
        # XLA:CPU copies weights sliced from stacked arrays: decode from per-layer buffers there
        self.layout = None if mesh is not None else programs.generation_layout(self.config)
        if self.layout:
            self.params = programs.split_layers(self.params, self.layout)
        if not is_integer(chunk) or chunk < 1:
            raise UserError(f"chunk must be a positive integer, got {chunk!r}")
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.chunk = chunk
        self.experts_fn = None
        self.batch_multiple = 1
        if mesh is not None:
            from mixtral_jax import sharding

            if not isinstance(mesh, jax.sharding.Mesh):
                raise UserError(f"mesh must be a jax.sharding.Mesh (e.g. sharding.make_mesh(MeshConfig(...))), "
                                f"got {type(mesh).__name__}")
            self.experts_fn = sharding.experts_fn(mesh, self.config)
            self.batch_multiple = sharding.batch_devices(mesh)
        if eos_ids is None:
            eos_ids = {self.config.eos_token_id} | ({tokenizer.eos_id} if tokenizer is not None else set())
        self.eos_ids = jnp.asarray(sorted(eos_ids), jnp.int32)

    def check(self, request: Request) -> None:
        """UserError when a request cannot run (empty prompt, no room in the context, bad settings)."""
        n, context = len(request.prompt), self.config.max_position_embeddings
        if n == 0:
            raise UserError("the prompt is empty")
        try:
            ids = np.asarray(request.prompt)  # one vectorised pass: batch jobs check millions of prompts
        except ValueError:  # ragged
            ids = np.asarray(None)
        if isinstance(request.prompt, (str, bytes)) or ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise UserError(f"a request's prompt is a list of token ids, got {request.prompt!r:.60}")
        if n >= context:
            raise UserError(f"the prompt has {n} tokens; the model's context is {context}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        self.check_settings(request)

    def check_settings(self, request: Request) -> None:
        """UserError when a request's settings (its prompt aside) cannot run: max_new_tokens < 0,
        an empty stop string, or a sampling setting `make_sampler` or `check_seeds` rejects."""
        max_new = request.max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
            raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new!r}")
        if isinstance(request.stop, str):
            raise UserError(f"stop is a tuple of strings: wrap one string as ({request.stop!r},)")
        for name in ("temperature", "top_k", "top_p"):
            if np.ndim(getattr(request, name)):
                raise UserError(f"{name} is one number per request, got {getattr(request, name)!r:.60}")
        if not all(isinstance(s, str) and s for s in request.stop):
            raise UserError(f"stop strings must be non-empty strings, got {list(request.stop)!r:.80}")
        if request.stop and self.tokenizer is None:
            raise UserError("stop strings need a tokenizer")
        try:
            make_sampler(request.temperature, request.top_k, request.top_p, vocab_size=self.config.vocab_size)
            check_seeds([request.seed])
        except ValueError as err:
            raise UserError(str(err)) from None

    def run(self, requests: Sequence[Request],
            on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Completions of one batch of requests (each checked first)."""
        for request in requests:
            self.check(request)
        if not requests:
            return []
        batch = self.prepare(requests)
        streams = _Streams(self.tokenizer, requests, on_text)
        chunk = self.chunk if streams.active else batch.buffer
        state = self.prefill(batch)
        while True:
            stopped = streams.update(state)
            if stopped.any():
                padded = np.pad(stopped, (0, batch.rows.max_new.shape[0] - len(requests)))
                state = state._replace(done=state.done | jnp.asarray(padded))
            if bool(jnp.all(state.done)):
                break
            state = self.decode(state, batch, state.steps + chunk)
        return streams.completions(state)

    def prepare(self, requests: Sequence[Request]) -> Batch:
        """The padded device inputs of a batch of requests (sizes bucketed)."""
        size = batch_rows(len(requests), self.batch_multiple)
        tokens, positions = _left_padded([r.prompt for r in requests], size)
        rows, sampler = self._row_settings(requests, size)
        return Batch(tokens, positions, rows, sampler, self._buffer(requests))

    def run_continuous(self, requests: Sequence[Request], rows: int) -> Iterator[list[tuple[int, Completion]]]:
        """Completions of `requests` through one batch of `rows` rows, where a row that finishes
        takes the next request (continuous batching). Yields, each time some rows finish, their
        (index into `requests`, Completion) pairs.

        `run` holds a batch until its longest row ends; here a row that stops early
        (EOS, a stop string, a smaller max_new_tokens) is prefilled with the next
        request at the next segment boundary (every `chunk` decode steps) while the
        other rows go on (returning at the first finished row instead measured no
        faster: more, smaller prefills). Rows never see each other: a request's
        tokens are those `run` gives it, up to rounding where the two prefill it in
        batches of other shapes (XLA:CPU picks matmul kernels by row count; so do
        two `run` calls of other batch sizes), which can flip a near-tie. Every
        row's cache holds the longest prompt (bucketed) plus the largest
        max_new_tokens of all `requests`.
        """
        for request in requests:
            self.check(request)
        if not requests:
            return
        vacant = len(requests)  # index of the padding row of the job's settings
        job_rows, job_sampler = self._row_settings(requests, vacant + 1)
        buffer = self._buffer(requests)
        prompt_len = bucket(max(len(r.prompt) for r in requests), MIN_PROMPT_BUCKET)
        slots = programs.cache_size(self.config, prompt_len, buffer)
        size = batch_rows(min(rows, len(requests)), self.batch_multiple)
        state = programs.empty_state(self.config, size, slots, buffer)
        owner = [vacant] * size  # the request each row runs
        streams = _Streams(self.tokenizer, [None] * size, None, active=any(r.stop for r in requests))
        queue = collections.deque(range(len(requests)))
        select = lambda indices: _select_rows(job_rows, job_sampler, indices)
        while True:
            free = [row for row in range(size) if owner[row] == vacant]
            if free and queue:
                taken = [(row, queue.popleft()) for row in free[:len(queue)]]
                state = self._start(state, taken, requests, select, vacant, slots, buffer)
                for row, index in taken:
                    owner[row] = index
                    streams.reset(row, requests[index])
                batch = Batch(None, None, *select(owner), buffer)
            stopped = streams.update(state)
            if stopped.any():
                state = state._replace(done=state.done | jnp.asarray(stopped))
            done = jax.device_get(state.done)
            finished = [row for row in range(size) if owner[row] != vacant and done[row]]
            if finished:
                yield list(zip([owner[row] for row in finished], streams.completions(state, finished)))
                for row in finished:
                    owner[row] = vacant
            if not queue and all(index == vacant for index in owner):
                return
            if not (queue and vacant in owner):  # else refill first
                state = self.decode(state, batch, state.steps + self.chunk)

    def _start(self, state, taken, requests, select, vacant: int, slots: int, buffer: int):
        """`state` with the requests `taken` [(row, index into requests)] prefilled into their rows."""
        size = batch_rows(len(taken), self.batch_multiple)
        tokens, positions = _left_padded([requests[index].prompt for _, index in taken], size)
        rows, sampler = select([index for _, index in taken] + [vacant] * (size - len(taken)))
        new = self.prefill(Batch(tokens, positions, rows, sampler, buffer), cache_slots=slots)
        target = [row for row, _ in taken] + [state.done.shape[0]] * (size - len(taken))  # out of range: dropped
        with self._mesh_context():
            return programs.insert(state, new, jnp.asarray(target, jnp.int32))

    def _max_new(self, request: Request) -> int:
        return min(request.max_new_tokens, self.config.max_position_embeddings - len(request.prompt))

    def _buffer(self, requests: Sequence[Request]) -> int:
        """New-token slots for `requests`: their largest max_new_tokens, bucketed."""
        return bucket(max(self._max_new(r) for r in requests), MIN_BUFFER_BUCKET)

    def _row_settings(self, requests: Sequence[Request], size: int):
        """(Rows, sampler) of `requests` followed by padding rows up to `size`."""
        pad_rows = size - len(requests)
        rows = programs.Rows(
            max_new=jnp.asarray([self._max_new(r) for r in requests] + [0] * pad_rows, jnp.int32),
            keys=row_keys([r.seed for r in requests] + [0] * pad_rows),
            eos_ids=self.eos_ids)
        per_row = lambda name, padding: np.asarray([getattr(r, name) for r in requests] + [padding] * pad_rows)
        sampler = make_sampler(per_row("temperature", 0.0), per_row("top_k", 0), per_row("top_p", 1.0),
                               batch=size, vocab_size=self.config.vocab_size)
        return rows, sampler

    def prefill(self, batch: Batch, cache_slots: int | None = None) -> programs.DecodeState:
        """Runs the prompts; the state holds each row's first new token. cache_slots: default
        the prompts' and the buffer's length (or the sliding window)."""
        slots = cache_slots or programs.cache_size(self.config, batch.tokens.shape[1], batch.buffer)
        with self._mesh_context():
            return programs.prefill(self.graphdef, self.params, batch.tokens, batch.positions, batch.rows,
                                    batch.sampler, cache_slots=slots, buffer=batch.buffer,
                                    experts_fn=self.experts_fn, layout=self.layout)

    def decode(self, state: programs.DecodeState, batch: Batch, until) -> programs.DecodeState:
        """Decodes until every row is done or `until` steps have run (the state is donated)."""
        with self._mesh_context():
            return programs.decode(self.graphdef, self.params, state, batch.rows, batch.sampler, until,
                                   experts_fn=self.experts_fn, layout=self.layout)

    def _mesh_context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from mixtral_jax import sharding

        return sharding.use_mesh(self.mesh)


class _Streams:
    """Host-side view of the rows between decode segments: streamed text and stop strings."""

    def __init__(self, tokenizer, requests: Sequence[Request | None], on_text, active: bool | None = None):
        """`requests[row]`: the request in each row (None: an empty row, until `reset`).
        active: whether to follow the text (default: when something streams or stops on it)."""
        self.tokenizer = tokenizer
        self.on_text = on_text
        if active is None:
            active = on_text is not None or any(r.stop for r in requests if r is not None)
        self.active = tokenizer is not None and active
        self.requests = list(requests)
        self._stream = getattr(tokenizer, "stream", None) or (lambda: _DiffStream(tokenizer))
        n = len(requests)
        self.decoders = [None] * n
        self.text = [""] * n  # text pushed so far (the stop string, once found, cut off)
        self.emitted = [0] * n  # characters of text passed to on_text
        self.seen = [0] * n  # tokens pushed
        self.stop_at = [None] * n  # tokens kept when a stop string ended the row
        self.finished = [False] * n
        for row, request in enumerate(requests):
            if request is not None:
                self.reset(row, request)

    def reset(self, row: int, request: Request) -> None:
        """Row `row` starts over with `request`."""
        self.requests[row] = request
        self.decoders[row] = self._stream() if self.active else None
        self.text[row], self.emitted[row], self.seen[row] = "", 0, 0
        self.stop_at[row], self.finished[row] = None, False

    def update(self, state: programs.DecodeState) -> np.ndarray:
        """Pushes the new tokens of every row; returns [rows] bool: rows a stop string just ended."""
        stopped = np.zeros(len(self.requests), bool)
        if not self.active:
            return stopped
        tokens, length, done = jax.device_get((state.tokens, state.length, state.done))
        for row, request in enumerate(self.requests):
            if request is None or self.finished[row]:
                continue
            longest = max((len(s) for s in request.stop), default=0)
            while self.stop_at[row] is None and self.seen[row] < length[row]:
                start = max(len(self.text[row]) - longest + 1, 0)  # a stop ending in the new text
                self.text[row] += self.decoders[row].push(int(tokens[row, self.seen[row]]))
                self.seen[row] += 1
                cut = _find_stop(self.text[row], request.stop, start)
                if cut is not None:
                    self.text[row], self.stop_at[row] = self.text[row][:cut], self.seen[row]
                    stopped[row] = True
            self.finished[row] = bool(done[row]) or self.stop_at[row] is not None
            if self.finished[row] and self.stop_at[row] is None:
                self.text[row] += self.decoders[row].flush()
            self._emit(row, request.stop)
        return stopped

    def _emit(self, row: int, stop: tuple[str, ...]) -> None:
        """Passes on new text, holding back what could be the start of a stop string."""
        if self.on_text is None:
            return
        hold = 0 if self.finished[row] else max((len(s) - 1 for s in stop), default=0)
        end = max(len(self.text[row]) - hold, self.emitted[row])
        if end > self.emitted[row]:
            self.on_text(row, self.text[row][self.emitted[row]:end])
            self.emitted[row] = end

    def completions(self, state: programs.DecodeState, rows: Sequence[int] | None = None) -> list[Completion]:
        """The finished `rows` (default: all) as `Completion`s."""
        tokens, length, hit_eos = jax.device_get((state.tokens, state.length, state.hit_eos))
        out = []
        for row in range(len(self.requests)) if rows is None else rows:
            stop_at = self.stop_at[row]
            new = [int(t) for t in tokens[row, :stop_at if stop_at is not None else length[row]]]
            if stop_at is not None:
                reason = "stop"
            else:
                reason = "eos" if hit_eos[row] else "length"
            if self.tokenizer is None:
                text = None
            else:
                text = self.text[row] if self.active else self.tokenizer.decode(new)
            out.append(Completion(new, text, reason, len(self.requests[row].prompt)))
        return out


def _left_padded(prompts: Sequence[Sequence[int]], rows: int) -> tuple[jax.Array, jax.Array]:
    """tokens, positions [rows, T] (T: the longest prompt, bucketed): each prompt ends at column
    T - 1; padding (and the rows past the prompts) holds token 0 at position -1."""
    prompt_len = bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
    tokens = np.zeros((rows, prompt_len), np.int32)
    positions = np.full((rows, prompt_len), -1, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = prompt
        positions[row, prompt_len - len(prompt):] = np.arange(len(prompt))
    return jnp.asarray(tokens), jnp.asarray(positions)


def _select_rows(rows: programs.Rows, sampler, indices: Sequence[int]):
    """(Rows, sampler) of the rows `indices` of a job's per-row settings."""
    at = jnp.asarray(indices, jnp.int32)
    return programs.Rows(rows.max_new[at], rows.keys[at], rows.eos_ids), jax.tree.map(lambda a: a[at], sampler)


def _find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the earliest stop string in `text[start:]` begins (an index into text), or None."""
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


class _DiffStream:
    """Incremental text for tokenizers without a `stream()` (e.g. byte-level): decodes all ids
    and passes on what is new, holding back a trailing incomplete character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        new, self.sent = text[self.sent:], max(self.sent, len(text))
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.sent = text[self.sent:], len(text)
        return new
