"""`reuse_freed_memory`: repeated large XLA buffers stop faulting in fresh pages."""

import json
import os
import platform
import subprocess
import sys

import pytest

from mixtral_jax.allocator import reuse_freed_memory, runs_on_cpu

# Returns a fresh 64 MB buffer per call, freed at once; prints the page faults of the last calls,
# and of touching a block of over 2 GiB that malloc hands out a second time (glibc's largest
# int-sized trim threshold would give that one back to the kernel in between).
SCRIPT = """
import ctypes, ctypes.util, json, resource, statistics
from mixtral_jax.allocator import reuse_freed_memory, reusing_freed_memory
reported_before = reusing_freed_memory()
applied = reuse_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
big = 2**31 + 2**27
libc.free(ctypes.memset(libc.malloc(big), 1, big))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(ctypes.memset(libc.malloc(big), 1, big))
big_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
import jax, jax.numpy as jnp
x = jnp.ones((64 * 2**20 // 4,), jnp.float32)
double = jax.jit(lambda x: x * 2)
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "reported": [reported_before, reusing_freed_memory()],
                  "faults": statistics.median(faults[-10:]),
                  "pages": x.nbytes // resource.getpagesize(),
                  "big_faults": big_faults, "big_pages": big // resource.getpagesize()}))
"""


def _run(opt_out: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_JAX_SYSTEM_MALLOC"}
    if opt_out:
        env["MIXTRAL_JAX_SYSTEM_MALLOC"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_buffers_are_reused_without_page_faults_unless_opted_out():
    kept, system = _run(opt_out=False), _run(opt_out=True)
    assert kept["applied"] and not system["applied"]
    assert kept["reported"] == [False, True] and system["reported"] == [False, False]
    assert system["faults"] > system["pages"] / 2  # glibc maps and unmaps each buffer anew
    assert kept["faults"] < kept["pages"] / 20
    assert system["big_faults"] > system["big_pages"] / 2
    assert kept["big_faults"] < kept["big_pages"] / 20


def test_only_a_cpu_backend_gets_it(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not runs_on_cpu() and not reuse_freed_memory()
    monkeypatch.delenv("JAX_PLATFORMS")
    (tmp_path / "some_package").mkdir()
    (tmp_path / "some_package" / "__init__.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # JAX with no accelerator plugin
    assert runs_on_cpu()
    (tmp_path / "jax_cuda12_plugin").mkdir()
    (tmp_path / "jax_cuda12_plugin" / "__init__.py").write_text("")
    assert not runs_on_cpu()
