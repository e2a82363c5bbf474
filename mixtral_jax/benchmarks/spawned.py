"""A benchmark baseline in a spawned process of its own: a fresh interpreter, with glibc's
malloc as its users run it (or with ours, when asked) and no JAX state.

The baselines used to share the benchmark's process, and so its malloc
settings (`mixtral_jax.allocator`), without asking: transformers' training
steps 1.4-1.6x faster on a Zen 4 machine, its bench-tiny decoding ~1.1x faster
on huge pages.
"""

from __future__ import annotations

import multiprocessing

from mixtral_jax.allocator import children_on_huge_pages


def _serve(conn, factory, args):
    """The child's loop: build `factory(*args)`, then answer each (method, args) received with
    that method's result; None ends it. Each answer is ("ok", value) or ("error", reason)."""
    try:
        target = factory(*args)
        conn.send(("ok", None))
        while (request := conn.recv()) is not None:
            method, method_args = request
            conn.send(("ok", getattr(target, method)(*method_args)))
    except Exception as err:  # reported by the parent, which would otherwise wait forever
        conn.send(("error", f"{type(err).__name__}: {err}"))


class Spawned:
    """`factory(*args)` built in a spawned process; `call(method, *args)` runs one of its methods
    there. Construction returns at once (two can build side by side); `wait_ready` blocks until
    the object is built. `huge_pages`: the child's malloc on huge pages
    (`allocator.children_on_huge_pages`). `label` names the process in errors. From a script
    of your own, create it under `if __name__ == "__main__":`, as multiprocessing requires."""

    def __init__(self, factory, *args, huge_pages: bool = False, label: str = "the baseline's"):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
        with children_on_huge_pages(huge_pages):  # glibc reads that setting as the process starts
            self._process.start()
        child.close()
        self.label = label

    def wait_ready(self) -> None:
        """Blocks until the object is built (raising RuntimeError with the child's error)."""
        self._receive()

    def call(self, method: str, *args):
        """The result of the object's `method(*args)`, run in the child."""
        self._conn.send((method, args))
        return self._receive()

    def close(self) -> None:
        """Ends the process."""
        if self._process.is_alive():
            self._conn.send(None)
        self._process.join()

    def _receive(self):
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.label} process exited (code {self._process.exitcode})") from None
        if kind != "ok":
            raise RuntimeError(f"{self.label} process failed: {payload}")
        return payload
