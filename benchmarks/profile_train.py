"""Where the time of one MLP VAE train step goes (batch 100, ELBO with one sample, Adam), in JAX.

    python -m benchmarks.profile_train [--samples 1] [--out benchmarks/results/profile_train.json]

Times (each call waits for its result), best of 5 runs of 200 calls each: the library's jitted train step (``make_train_step``), the gradient of the
loss alone, the loss alone, the Adam update alone, and the bare network: the same six weight matrices without
biases, activations, sampling or likelihood, forward and backward (the 18 matmuls of a step). The difference between
the step and the bare matmuls is the cost of everything else; the compiled step's kernel count is recorded too
(each fused kernel is one call into XLA's CPU runtime).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import flops  # noqa: E402
from benchmarks.common import machine, time_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_ms(fn, calls: int = 200) -> float:
    """Milliseconds per call of ``fn`` (which blocks until its result is ready), best of 5 repeats."""
    fn()
    return 1e3 * min(time_calls(fn, calls=calls))


def kernel_count(compiled_text: str) -> dict[str, int]:
    entry = compiled_text[compiled_text.index("ENTRY"):]
    kinds: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        m = re.search(r"= \S+ ([\w-]+)\(", line)
        if m and m.group(1) not in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
            kinds[m.group(1)] = kinds.get(m.group(1), 0) + 1
    return kinds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M (1: ELBO; more: IWAE)")
    ap.add_argument("--out", default=str(RESULTS / "profile_train.json"))
    args = ap.parse_args(argv)

    from dlvm_jax.models.vae import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss
    from dlvm_jax.train import init_state, make_train_step

    batch, m = 100, args.samples
    model = VAE(VAEConfig())
    loss_fn = make_loss(model, objective="elbo" if m == 1 else "iwae", num_samples=m)
    x = jnp.asarray((np.random.default_rng(0).random((batch, 784)) < 0.13).astype(np.float32))
    opt = optax.adam(1e-3)
    params = jax.jit(model.init)(jax.random.key(0))
    key = jax.random.key(2)
    step0 = jnp.asarray(0)

    state = [init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(1))]
    step = make_train_step(loss_fn, opt)
    kernels = kernel_count(step.lower(state[0], x).compile().as_text())

    def run_step():
        state[0], metrics = step(state[0], x)
        return jax.block_until_ready(metrics)

    loss_only = jax.jit(lambda p: loss_fn(p, x, key, step0)[0])
    grad_only = jax.jit(jax.grad(lambda p: loss_fn(p, x, key, step0)[0]))
    grads = grad_only(params)
    opt_state = opt.init(params)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))

    weights = [params["encoder"][f"Dense_{i}"]["kernel"] for i in range(3)]
    weights += [params["decoder"][f"Dense_{i}"]["kernel"] for i in range(3)]
    latent = model.config.latent_dim

    def bare(ws, x):
        h = x @ ws[0] @ ws[1] @ ws[2]
        z = jnp.broadcast_to(h[:, :latent], (m,) + h[:, :latent].shape).reshape(-1, latent)
        return jnp.sum(z @ ws[3] @ ws[4] @ ws[5])

    bare_grad = jax.jit(jax.grad(bare))
    rows = {
        "train step (library)": best_ms(run_step),
        "gradient of the loss": best_ms(lambda: jax.block_until_ready(grad_only(params))),
        "loss alone": best_ms(lambda: jax.block_until_ready(loss_only(params))),
        "Adam update alone": best_ms(lambda: jax.block_until_ready(update(grads, opt_state, params))),
        "bare network, forward + backward (18 matmuls)": best_ms(lambda: jax.block_until_ready(bare_grad(weights, x))),
    }
    gflop = flops.train_step_flops("mlp_vae", batch, m) / 1e9
    out = {"machine": machine(), "batch": batch, "num_samples": m, "gflop_per_step": gflop,
           "ms": {k: round(v, 3) for k, v in rows.items()},
           "bare_matmul_gflops": round(1e3 * gflop / rows["bare network, forward + backward (18 matmuls)"], 1),
           "step_gflops": round(1e3 * gflop / rows["train step (library)"], 1),
           "compiled_step_kernels": kernels}
    for k, v in rows.items():
        print(f"{k:<50} {v:8.3f} ms")
    print(f"{gflop:.3f} GFLOP per step: {out['step_gflops']} GFLOP/s for the step, "
          f"{out['bare_matmul_gflops']} GFLOP/s for the bare matmuls; compiled step kernels {kernels}")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
