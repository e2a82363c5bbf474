"""A native CPU kernel for inference's expert matmuls, built on first use with the
machine's C++ compiler and called as an XLA FFI custom call.

`grouped_rows` multiplies each expert's rows by that expert's weight, reading the
weight once as contiguous panels of 32 columns (`to_panels`) and applying it to
up to eight rows at a time in registers, split over XLA's intra-op threads
(grouped_rows.cc). XLA:CPU's own matmuls stream such few-row products well below
the memory's pace; this one keeps up with it. It is built with `-march=native`
into a cache directory (one library per source, compiler, JAX version and CPU)
and loaded once per process. Off with MIXTRAL_JAX_NATIVE=0, on other backends,
and where no compiler builds it (a warning says why): `available()` is then
False and inference takes the XLA path (`infer.decode.blocked_ffn`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from mixtral_jax.cpuinfo import read_cpuinfo

__all__ = ["PANEL", "available", "grouped_rows", "to_panels"]

PANEL = 32  # columns per weight panel (grouped_rows.cc's kWidth)
SOURCE = Path(__file__).with_name("grouped_rows.cc")
TARGET = "mixtral_jax_grouped_rows"
SWITCH = "MIXTRAL_JAX_NATIVE"  # "0" keeps inference on XLA's matmuls
BUILD_SECONDS = 300  # a compile that takes longer is given up (it takes ~2 s)


def cache_dir() -> Path:
    """Where built libraries are kept: $XDG_CACHE_HOME (or ~/.cache)/mixtral-jax/native."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixtral-jax" / "native"


def _compile_command(compiler: str) -> list[str]:
    return [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-isystem", jax.ffi.include_dir()]


def library_path(compiler: str) -> Path:
    """The library's place in `cache_dir()`, named by what it is built from: the source, the
    compile command, JAX's version (its FFI headers) and the CPU (-march=native)."""
    key = hashlib.sha256(SOURCE.read_bytes())
    cpu_flags = [line for line in read_cpuinfo().splitlines() if line.startswith(("flags", "Features"))][:1]
    for part in (*_compile_command(compiler), jax.__version__, platform.machine(), *cpu_flags):
        key.update(part.encode())
    return cache_dir() / f"grouped_rows-{key.hexdigest()[:16]}.so"


def build(compiler: str) -> Path:
    """The built library, compiled first unless the cache has it."""
    path = library_path(compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            subprocess.run([*_compile_command(compiler), str(SOURCE), "-o", str(built)],
                           check=True, capture_output=True, text=True, timeout=BUILD_SECONDS)
            os.replace(built, path)  # whole or absent, also with builders in other processes
    return path


def find_compiler() -> str | None:
    """The C++ compiler that builds the kernel: $CXX, else g++ or c++ on the PATH (None: none)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def available() -> bool:
    """Whether `grouped_rows` runs in this process: the CPU backend, not switched off
    (MIXTRAL_JAX_NATIVE=0), and the library built and registered (once per process)."""
    if os.environ.get(SWITCH) == "0" or jax.default_backend() != "cpu":
        return False
    compiler = find_compiler()
    if compiler is None:
        warnings.warn("no C++ compiler (g++, or $CXX) to build the native expert kernel: "
                      "CPU inference takes XLA's matmuls")
        return False
    try:
        path = build(compiler)
    except (OSError, subprocess.SubprocessError) as error:  # no compiler, a failed or stuck build
        said = getattr(error, "stderr", None) or str(error)
        warnings.warn(f"the native expert kernel did not build ({said.strip().splitlines()[-1]}): "
                      "CPU inference takes XLA's matmuls")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.GroupedRows), platform="cpu")
    except (OSError, AttributeError) as error:
        warnings.warn(f"the native expert kernel did not load ({error}): CPU inference takes XLA's matmuls")
        return False
    return True


def to_panels(w):
    """Weights [..., K, N] as [..., P, K, PANEL], P = ceil(N / PANEL): column panels, each
    contiguous, the last padded with zero columns."""
    *lead, depth, columns = w.shape
    panels = -(-columns // PANEL)
    w = jnp.pad(w, [(0, 0)] * (len(lead) + 1) + [(0, panels * PANEL - columns)])
    return jnp.moveaxis(w.reshape(*lead, depth, panels, PANEL), -2, -3)


def grouped_rows(x, group_sizes, w_panels, columns: int):
    """Each group's rows times its weight: x [M, K] float32 with its rows sorted by group,
    group_sizes [G] (rows past their sum come out zero), w_panels `to_panels` of the
    weights [G, K, columns] -> [M, columns]. Needs `available()`."""
    panels = w_panels.shape[-3]
    y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], panels * PANEL), jnp.float32))(
        x, group_sizes.astype(jnp.int32), w_panels)
    return y if columns == panels * PANEL else y[:, :columns]
