"""Keep freed host memory in the process, so each step's buffers reuse pages already mapped.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pkgutil
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
OPT_OUT = "MIXTRAL_JAX_SYSTEM_MALLOC"  # set to 1 to leave glibc's defaults alone
_applied = False  # whether reuse_freed_memory() has changed this process's malloc


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, judged without starting it (which would be too
    late to change malloc): JAX_PLATFORMS says cpu, or no GPU/TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    accelerator = ("jax_cuda", "jax_rocm", "libtpu", "jax_plugins")
    return not any(module.name.startswith(accelerator) for module in pkgutil.iter_modules())


def reuse_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory mapped (one arena, no mmap, no trim).

    Returns whether it applied: only with glibc, when JAX runs on the CPU (an
    accelerator's steps allocate little host memory), and unless the
    environment sets MIXTRAL_JAX_SYSTEM_MALLOC=1.
    """
    if os.environ.get(OPT_OUT, "") not in ("", "0") or platform.libc_ver()[0] != "glibc" or not runs_on_cpu():
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
