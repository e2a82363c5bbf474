"""`reuse_freed_memory`: repeated large XLA buffers stop faulting in fresh pages; malloc on huge
pages for the commands that train."""

import json
import os
import platform
import subprocess
import sys

import pytest

from mixtral_jax import allocator
from mixtral_jax.allocator import (HUGE_PAGES, OPT_OUT, children_on_huge_pages, huge_pages_environ, on_huge_pages,
                                   reuse_freed_memory, runs_on_cpu)

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")

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
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT}
    if opt_out:
        env[OPT_OUT] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@glibc_only
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


@glibc_only
def test_huge_pages_are_added_to_the_tunables_unless_set_or_not_wanted(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    kernel = tmp_path / "enabled"
    monkeypatch.setattr(allocator, "_KERNEL_HUGE_PAGES", str(kernel))
    kernel.write_text("always [madvise] never\n")
    assert huge_pages_environ({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES}
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert huge_pages_environ(mine)["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES}"
    assert huge_pages_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice
    assert huge_pages_environ({"GLIBC_TUNABLES": HUGE_PAGES}) is None  # already restarted
    assert huge_pages_environ({OPT_OUT: "1"}) is None
    kernel.write_text("always madvise [never]\n")
    assert huge_pages_environ({}) is None
    kernel.unlink()  # no transparent huge pages in this kernel
    assert huge_pages_environ({}) is None
    kernel.write_text("[always] madvise never\n")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert huge_pages_environ({}) is None


@glibc_only
def test_children_get_huge_pages_only_when_asked(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(allocator, "_kernel_offers_huge_pages", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{HUGE_PAGES}")
    with children_on_huge_pages(False):
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert on_huge_pages()
    monkeypatch.delenv("GLIBC_TUNABLES")
    with children_on_huge_pages(True):
        assert on_huge_pages()
    assert "GLIBC_TUNABLES" not in os.environ and not on_huge_pages()
    with children_on_huge_pages(False):
        assert "GLIBC_TUNABLES" not in os.environ


HUGE_SCRIPT = """
import ctypes, ctypes.util
from mixtral_jax.allocator import reuse_freed_memory
reuse_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
block = ctypes.memset(libc.malloc(2**28), 1, 2**28)
rollup = open("/proc/self/smaps_rollup").read()
print(int(rollup.split("AnonHugePages:")[1].split()[0]))
"""


@pytest.mark.slow
@glibc_only
@pytest.mark.skipif(huge_pages_environ({**os.environ, "JAX_PLATFORMS": "cpu"}) is None,
                    reason="no transparent huge pages here (or opted out)")
def test_with_the_tunable_malloc_hands_out_huge_pages():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    kib = [int(subprocess.run([sys.executable, "-c", HUGE_SCRIPT], env=e, capture_output=True, text=True,
                              check=True).stdout) for e in (huge_pages_environ(env), env)]
    assert kib[0] >= 2**27 // 1024  # at least half of the 256 MB block on 2 MB pages
    assert kib[1] < kib[0]


TINY_BENCH_TRAIN = ["train", "--config", "bench-tiny", "train.steps=2", "train.batch_size=2", "train.seq_len=16",
                    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=64",
                    "model.moe_impl=reference", "--torch-steps", "0", "--matmul-size", "256"]
TINY_BENCH_DECODE = ["decode", "--presets", "tiny", "--batches", "1", "--prompt-len", "8", "--new-tokens", "4",
                     "--repeats", "1", "--no-torch"]


@pytest.mark.slow
@glibc_only
@pytest.mark.parametrize("bench", [TINY_BENCH_TRAIN, TINY_BENCH_DECODE], ids=["train", "decode"])
def test_the_console_script_restarts_on_huge_pages(bench):
    """`bench train` and `bench decode` from the command line: the process starts over once with
    the tunable (where it applies) and reports it; the JSON is printed once."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "mixtral_jax.cli", "bench", *bench]
    result = json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)
    assert result["huge_pages"] is (huge_pages_environ(env) is not None)
