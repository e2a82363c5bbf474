"""`reuse_freed_memory`: repeated large XLA buffers stop faulting in fresh pages."""

import json
import os
import platform
import subprocess
import sys

import pytest

# Returns a fresh 64 MB buffer per call, freed at once; prints the page faults of the last calls.
SCRIPT = """
import json, resource, statistics
from mixtral_jax.allocator import reuse_freed_memory
applied = reuse_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((64 * 2**20 // 4,), jnp.float32)
double = jax.jit(lambda x: x * 2)
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    double(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": statistics.median(faults[-10:]),
                  "pages": x.nbytes // resource.getpagesize()}))
"""


def _run(opt_out: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MIXTRAL_JAX_SYSTEM_MALLOC"}
    if opt_out:
        env["MIXTRAL_JAX_SYSTEM_MALLOC"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_buffers_are_reused_without_page_faults_unless_opted_out():
    kept, system = _run(opt_out=False), _run(opt_out=True)
    assert kept["applied"] and not system["applied"]
    assert system["faults"] > system["pages"] / 2  # glibc maps and unmaps each buffer anew
    assert kept["faults"] < kept["pages"] / 20
