"""The conv VAE's gradient with XLA's temporaries in one block and in heaps of several sizes (page faults, ms).

    python -m benchmarks.profile_heaps [--heaps-mib 0,20,24,28] [--samples 1] [--out FILE]

Each heap size runs in a fresh process (glibc's state is per process): the gradient of the conv VAE loss of
``python -m benchmarks`` (batch 100) jitted by ``dlvm_jax.runtime.tuned_jit`` with
``TEMP_HEAP_BYTES`` set to that size (0: XLA's one block of temporaries, the option unset; with an array over
that size, as at M=10, the option is not applied either), three warm-up calls, then 20 repeats of 3 calls, each repeat's
milliseconds a call and minor page faults a call (``ru_minflt``). ``dlvm_jax.runtime.TEMP_HEAP_BYTES`` was chosen
from this sweep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "profile_heaps.json"
ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, resource, sys, time
sys.modules.setdefault("tensorflow", None)
import jax, jax.numpy as jnp, numpy as np
from benchmarks.worker import _jax_model
from dlvm_jax import runtime
samples = int(sys.argv[1])
runtime.TEMP_HEAP_BYTES = int(sys.argv[2])
model, loss_fn = _jax_model("conv_vae", samples)
params = jax.jit(model.init)(jax.random.key(0))
batch = jnp.asarray((np.random.default_rng(0).random((100, 28, 28, 1)) < 0.13).astype(np.float32))
grad = runtime.tuned_jit(jax.grad(lambda p, b, k: loss_fn(p, b, k, 0)[0]))
key = jax.random.key(1)
for _ in range(3):
    jax.block_until_ready(grad(params, batch, key))
ms, faults = [], []
for _ in range(20):
    before, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(grad(params, batch, key))
    ms.append((time.perf_counter() - t) / 3 * 1e3)
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
print("RESULT " + json.dumps({"ms": ms, "faults": faults}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_heaps", description=__doc__.split("\n\n")[0])
    p.add_argument("--heaps-mib", default="0,20,24,28", help="heap sizes in MiB, comma-separated (0: one block)")
    p.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    import numpy as np

    from benchmarks.common import machine, write_result

    rows = []
    for mib in (float(h) for h in args.heaps_mib.split(",")):
        proc = subprocess.run([sys.executable, "-c", WORKER, str(args.samples), str(int(mib * 2**20))], cwd=ROOT,
                              capture_output=True, text=True, check=True)
        out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        row = {"heap_mib": mib, "ms_min": round(min(out["ms"]), 2), "ms_median": round(float(np.median(out["ms"])), 2),
               "faults_median": float(np.median(out["faults"])), "faults_max": max(out["faults"]),
               "repeats_with_faults": sum(f > 100 for f in out["faults"]), "repeats": len(out["faults"])}
        print(f"heap {'one block' if not mib else f'{mib:g} MiB':>10}: {row['ms_median']:7.1f} ms median "
              f"({row['ms_min']:.1f} min), page faults a call: median {row['faults_median']:.0f}, max "
              f"{row['faults_max']:.0f}, {row['repeats_with_faults']}/{row['repeats']} repeats with faults", flush=True)
        rows.append(row)
    write_result(args.out, {"model": "conv_vae", "batch": 100, "samples": args.samples, "rows": rows,
                            "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
