"""Host memory for CPU training: freed memory kept in the process, on huge pages.

XLA:CPU allocates every step's temporaries and outputs afresh. glibc serves
large blocks with `mmap` (and per-thread arenas from heaps it trims), so the
memory goes back to the kernel when freed, and the next step touches it anew:
bench-tiny's train step took ~70k page faults (286 MB) each time, about 10%
of the step. With one arena, no `mmap` and no trimming, the freed blocks stay
in the heap and the faults are gone. No trimming means no threshold at all:
bench-small's step frees over 2 GiB at once, and with the threshold at the
largest positive int glibc still gave that back, so ~1.4 GB were faulted in
again each step (5% of it). The price: resident memory never falls from its
peak, and sits above it by what the heap cannot reuse (+21% on the
default training run).

On a CPU backend, `mixtral-jax train` and `bench train` call
`reuse_freed_memory()` before JAX starts; generation gains nothing from it
(its decode loop allocates little) and is left alone. In your own process,
call it first thing: threads that already have an arena keep it.

Huge pages: the commands that run the model (`train`, `generate`, `batch`,
`eval`, and `bench train`, `decode` and `batch`) restart themselves once, at
once, with glibc's `glibc.malloc.hugetlb=1` tunable
(`restart_with_huge_pages`), which glibc reads only when a process starts.
malloc then asks the kernel for transparent huge pages, so the weights and
the step's multi-megabyte buffers take 2 MB pages rather than 4 KB ones: a
bench-tiny training step 1.02-1.05x faster in six pairs of processes,
bench-small's 1.02-1.03x in four of five, bench-small's decoding at batch 32
1.01-1.04x in five (Zen 5). In your own process, start Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pkgutil
import platform
import sys
from collections.abc import Mapping

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
OPT_OUT = "MIXTRAL_JAX_SYSTEM_MALLOC"  # set to 1 to leave glibc's defaults alone
HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE) on what malloc maps
_KERNEL_HUGE_PAGES = "/sys/kernel/mm/transparent_hugepage/enabled"  # "always [madvise] never"
_applied = False  # whether reuse_freed_memory() has changed this process's malloc


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, judged without starting it (which would be too
    late to change malloc): JAX_PLATFORMS says cpu, or no GPU/TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    accelerator = ("jax_cuda", "jax_rocm", "libtpu", "jax_plugins")
    return not any(module.name.startswith(accelerator) for module in pkgutil.iter_modules())


def _tunes_malloc(environ: Mapping[str, str]) -> bool:
    """Not opted out, glibc's malloc, and JAX on the CPU."""
    return environ.get(OPT_OUT, "") in ("", "0") and platform.libc_ver()[0] == "glibc" and runs_on_cpu()


def reuse_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory mapped (one arena, no mmap, no trim).

    Returns whether it applied: only with glibc, when JAX runs on the CPU (an
    accelerator's steps allocate little host memory), and unless the
    environment sets MIXTRAL_JAX_SYSTEM_MALLOC=1.
    """
    if not _tunes_malloc(os.environ):
        return False
    global _applied
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # mallopt's int becomes a size_t threshold: -1 is SIZE_MAX, never trim
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    if all(libc.mallopt(param, value) == 1 for param, value in settings):
        _applied = True
    return _applied


def reusing_freed_memory() -> bool:
    """Whether `reuse_freed_memory()` has applied in this process."""
    return _applied


def _kernel_offers_huge_pages() -> bool:
    """Whether Linux hands out transparent huge pages to memory that asks (not "never")."""
    try:
        with open(_KERNEL_HUGE_PAGES) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _tunables(environ: Mapping[str, str]) -> list[str]:
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with `HUGE_PAGES` added to GLIBC_TUNABLES, or None where that would change
    nothing or is not wanted: some `glibc.malloc.hugetlb` already set, opted out (OPT_OUT),
    not glibc, JAX not on the CPU, or the kernel's transparent huge pages off."""
    tunables = _tunables(environ)
    if (any(t.startswith("glibc.malloc.hugetlb=") for t in tunables) or not _tunes_malloc(environ)
            or not _kernel_offers_huge_pages()):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, HUGE_PAGES])}


def restart_with_huge_pages() -> None:
    """Re-executes this process (the same interpreter, arguments and PID) with malloc on huge
    pages (`huge_pages_environ`), where that changes anything; otherwise returns. The process
    starts over: call it before it has done anything worth keeping."""
    environ = huge_pages_environ(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)


def on_huge_pages() -> bool:
    """Whether this process's malloc asks for huge pages (GLIBC_TUNABLES holds `HUGE_PAGES`)."""
    return HUGE_PAGES in _tunables(os.environ)


@contextlib.contextmanager
def children_on_huge_pages(wanted: bool):
    """Processes started in the block run malloc on huge pages if `wanted` (where
    `huge_pages_environ` applies), and without the `HUGE_PAGES` this process may carry if not."""
    saved = os.environ.get("GLIBC_TUNABLES")
    if wanted:
        value = (huge_pages_environ(os.environ) or os.environ).get("GLIBC_TUNABLES")
    else:
        value = ":".join(t for t in _tunables(os.environ) if t != HUGE_PAGES) or None
    _set_tunables(value)
    try:
        yield
    finally:
        _set_tunables(saved)


def _set_tunables(value: str | None) -> None:
    if value is None:
        os.environ.pop("GLIBC_TUNABLES", None)
    else:
        os.environ["GLIBC_TUNABLES"] = value
