"""dlvm_jax.runtime.keep_freed_memory: repeated jitted calls stop page-faulting their temporaries in afresh."""

import json
import platform
import subprocess
import sys

import pytest

# A jitted function with an 80 MB temporary (the first matmul's output, which the second reads), called
# repeatedly; prints the minor page faults per call after warm-up.
PROGRAM = """
import json, resource, sys
from dlvm_jax.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ w.T, axis=0))
x, w = jnp.ones((10240, 8)), jnp.ones((8, 2048)) / 8
for _ in range(3):
    f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"applied": applied, "faults": faults}))
"""

PAGES = 10240 * 2048 * 4 // 4096  # pages of the temporary


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_page_faults():
    default, kept = _faults("default"), _faults("keep")
    assert kept["applied"] is True
    assert default["faults"] > 0.5 * PAGES  # glibc maps and unmaps the temporary at every call...
    assert kept["faults"] < 0.05 * PAGES  # ...and keeps it for the next call once told to


def test_keep_freed_memory_is_a_no_op_elsewhere(monkeypatch):
    from dlvm_jax import runtime

    monkeypatch.setattr(runtime, "_applied", False)
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.keep_freed_memory() is False
