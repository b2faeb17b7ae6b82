"""Data-parallel scaling: training throughput of one VAE on 1, 2, 4, 8 devices (dlvm_jax.parallel).

    python -m benchmarks.scaling                  # CPU: 1, 2, 4, 8 simulated devices, one subprocess each
    python -m benchmarks.scaling --devices 1,2    # any device counts
    python -m benchmarks.scaling --real           # the devices JAX sees (GPUs, TPUs): 1, 2, 4 ... of them

Model: an MLP VAE on 784-dimensional data (hidden 512,512, 32 latents, Bernoulli likelihood, ELBO), Adam, the
way ``dlvm train`` trains it: ``train.make_epoch`` (``lax.scan`` over the batches of an epoch) with the state and
data replicated on a ``data`` mesh and every batch split over its devices. Two settings per device count:

* strong scaling: the global batch fixed (256), split over more devices;
* weak scaling: 64 examples per device (global batch 64 x devices).

Throughput is examples per second over whole epochs of 16 batches (compilation excluded and reported on its own),
the median of 5 repeats after a warm-up epoch. On CPU the devices are simulated by
``XLA_FLAGS=--xla_force_host_platform_device_count=N``: they share the machine's cores, so the curve measures the
cost of partitioning (all-reduce, smaller matrix products), not a speed-up. Writes
benchmarks/results/scaling.json (or ``--out``), with the machine description and its load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "scaling.json"
BATCHES_PER_EPOCH = 16
STRONG_BATCH = 256
WEAK_PER_DEVICE = 64


def measure(num_devices: int, *, repeats: int = 5) -> dict[str, Any]:
    """Throughput on the first ``num_devices`` devices of this process."""
    import jax
    import numpy as np
    import optax

    from benchmarks.common import machine, median
    from dlvm_jax import parallel, train
    from dlvm_jax.models import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss

    model = VAE(VAEConfig(data_shape=(784,), latent_dim=32, hidden=(512, 512), likelihood="bernoulli"))
    loss_fn = make_loss(model)
    optimizer = optax.adam(1e-3)
    mesh = parallel.make_mesh(num_devices)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"devices": num_devices, "mesh": parallel.describe(mesh), "machine": machine()}
    for setting, batch in (("strong", STRONG_BATCH), ("weak", WEAK_PER_DEVICE * num_devices)):
        data = parallel.replicate((rng.random((batch * BATCHES_PER_EPOCH, 784)) < 0.3).astype(np.float32), mesh)
        epoch = train.make_epoch(loss_fn, optimizer, batch_size=batch, mesh=mesh)
        box = [parallel.replicate(train.init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1)),
                                  mesh)]

        def one_epoch() -> None:
            box[0], metrics = epoch(box[0], data)
            jax.block_until_ready(metrics)

        start = time.perf_counter()
        one_epoch()
        compile_s = time.perf_counter() - start
        one_epoch()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            one_epoch()
            times.append(time.perf_counter() - start)
        seconds = median(times)
        out[setting] = {"global_batch": batch, "per_device_batch": batch // num_devices,
                        "examples_per_s": round(batch * BATCHES_PER_EPOCH / seconds, 1),
                        "steps_per_s": round(BATCHES_PER_EPOCH / seconds, 2),
                        "epoch_seconds_median": round(seconds, 4), "epoch_seconds_all": [round(t, 4) for t in times],
                        "compile_seconds": round(compile_s, 2)}
    return out


def _subprocess(num_devices: int) -> dict[str, Any]:
    """``measure`` in a fresh process with ``num_devices`` simulated CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}").strip()
    code = ("import json, sys; sys.modules['tensorflow'] = None; from benchmarks.scaling import measure; "
            "print('RESULT ' + json.dumps(measure(int(sys.argv[1]))))")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(num_devices)], cwd=root, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the {num_devices}-device run failed: {proc.stderr[-2000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts [1,2,4,8]")
    parser.add_argument("--real", action="store_true",
                        help="use the devices JAX sees in this process (GPUs) instead of simulated CPU devices")
    parser.add_argument("--out", default=str(OUT), help=f"result file [{OUT.relative_to(OUT.parents[2])}]")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs = []
    for n in counts:
        result = measure(n) if args.real else _subprocess(n)
        runs.append(result)
        print(f"{n} device(s): strong scaling (global batch {STRONG_BATCH}) "
              f"{result['strong']['examples_per_s']:10.1f} examples/s; weak scaling ({WEAK_PER_DEVICE} per device) "
              f"{result['weak']['examples_per_s']:10.1f} examples/s; compile {result['strong']['compile_seconds']:.1f} s",
              flush=True)
    base = runs[0]
    for r in runs:
        for setting in ("strong", "weak"):
            r[setting]["relative_to_first"] = round(r[setting]["examples_per_s"] / base[setting]["examples_per_s"], 3)
    machine = dict(base["machine"], device=base["machine"]["device"], devices=[r["mesh"] for r in runs])
    report = {
        "what": "VAE 784-512-512-32 (Bernoulli, ELBO, Adam) training throughput, scanned epochs of 16 batches, "
                "state and data replicated, batches split over a 'data' mesh",
        "simulated": not args.real,
        "note": ("CPU devices simulated with --xla_force_host_platform_device_count on the machine's cores: "
                 "all of them share the same cores, so this measures the partitioning overhead, not a speed-up"
                 if not args.real else "real devices"),
        "command": "python -m benchmarks.scaling" + (" --real" if args.real else "") +
                   (f" --devices {args.devices}" if args.devices != "1,2,4,8" else ""),
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "runs": [{k: v for k, v in r.items() if k != "machine"} for r in runs],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
