"""GMVAE train-step throughput on the spiral setting (batch 200, K=5 clusters, hidden 100), M=1 and M=10.

    python -m benchmarks.gmvae_steps

Two ways of driving the same jitted step: one dispatch per step (``make_train_step``), and one dispatch per epoch
(``make_epoch``: ``lax.scan`` over the 25 batches of 5,000 points, how dlvm trains). Compilation is excluded from
throughput and reported on its own; each figure is the median of 5 repeats after a warm-up.
Writes benchmarks/results/gmvae_steps.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import machine, median, time_calls
from dlvm_jax.data import make_spiral
from dlvm_jax.models.gmvae import GMVAE, GMVAEConfig, make_gmvae_loss
from dlvm_jax.train import init_state, make_epoch, make_train_step

OUT = Path(__file__).resolve().parent / "results" / "gmvae_steps.json"


def bench(num_samples: int, batch_size: int = 200) -> dict:
    model = GMVAE(GMVAEConfig())
    loss_fn = make_gmvae_loss(model, num_samples=num_samples)
    opt = optax.adam(1e-3)
    x = jnp.asarray(make_spiral(5000, seed=0)[0])
    batch = x[:batch_size]
    res: dict = {"num_samples": num_samples, "batch_size": batch_size}

    state = init_state(model.init(jax.random.key(0)), opt, jax.random.key(1))
    step = make_train_step(loss_fn, opt)
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    res["compile_seconds_step"] = round(time.perf_counter() - t, 3)
    box = [state]

    def one_step():
        box[0], metrics = step(box[0], batch)
        jax.block_until_ready(metrics)

    for _ in range(50):
        one_step()
    times = time_calls(one_step, calls=300)
    res["steps_per_s_dispatch_per_step"] = round(1.0 / median(times), 1)

    epoch = make_epoch(loss_fn, opt, batch_size=batch_size)
    state = init_state(model.init(jax.random.key(0)), opt, jax.random.key(1))
    t = time.perf_counter()
    state, m = epoch(state, x)
    jax.block_until_ready(m)
    res["compile_seconds_epoch"] = round(time.perf_counter() - t, 3)
    box = [state]
    steps_per_epoch = x.shape[0] // batch_size

    def one_epoch():
        box[0], metrics = epoch(box[0], x)
        jax.block_until_ready(metrics)

    for _ in range(3):
        one_epoch()
    times = time_calls(one_epoch, calls=20)
    res["steps_per_s_scan_epoch"] = round(steps_per_epoch / median(times), 1)
    return res


def main() -> int:
    results = {"machine": machine(), "model": "GMVAE spiral (K=5, hidden 100, l and w 2-D), batch 200",
               "settings": [bench(1), bench(10)]}
    for r in results["settings"]:
        print(f"M={r['num_samples']:>2}: {r['steps_per_s_scan_epoch']:8.1f} steps/s (scan over an epoch), "
              f"{r['steps_per_s_dispatch_per_step']:8.1f} steps/s (one dispatch per step); compile "
              f"{r['compile_seconds_step']:.2f} s (step), {r['compile_seconds_epoch']:.2f} s (epoch)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
