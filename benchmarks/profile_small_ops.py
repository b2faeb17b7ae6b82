"""The small shapes XLA's CPU backend runs badly, and what dlvm_jax writes instead (each pair computes the same
numbers; the library uses the second of each).

    python -m benchmarks.profile_small_ops [--out benchmarks/results/profile_small_ops.json]

* a sum over a short last axis (200,000 rows): ``jnp.sum(axis=-1)`` against ``distributions.sum_last``;
* a Dense layer with few inputs, 10,000 rows to 100 outputs with tanh: a matmul against
  ``networks.few_inputs_dot`` (forward, and forward + backward);
* softplus on 10^6 values: ``log1p(exp(-|x|))`` against ``log(1 + exp(-|x|))`` (``distributions.softplus``);
* the compiled MLP VAE train step (batch 100, ELBO, Adam): kernels and random-number loops with one key per example
  (``split(key, B)``, as before 2026-12-02) against the batch's noise drawn at once (``make_loss``).

Times are the best of 5 runs of ``--calls`` calls each (milliseconds per call).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import machine, time_calls  # noqa: E402
from dlvm_jax import distributions as dists  # noqa: E402
from dlvm_jax import networks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_ms(fn, *args, calls: int) -> float:
    jax.block_until_ready(fn(*args))
    return round(1e3 * min(time_calls(lambda: jax.block_until_ready(fn(*args)), calls=calls)), 4)


def short_axis_sums(calls: int) -> list[dict]:
    rows = []
    for n in (2, 5, 8, 16):
        a = jax.random.normal(jax.random.key(0), (200_000, n))
        body = lambda a: jnp.log1p(jnp.exp(a)) * a  # noqa: E731  (some elementwise work feeding the sum)
        rows.append({"entries": n,
                     "jnp_sum_ms": best_ms(jax.jit(lambda a: jnp.sum(body(a), axis=-1)), a, calls=calls),
                     "sum_last_ms": best_ms(jax.jit(lambda a: dists.sum_last(body(a))), a, calls=calls)})
    return rows


def few_input_dense(calls: int) -> list[dict]:
    rows = []
    dims = (((1,), (0,)), ((), ()))
    for k in (2, 4, 8, 16):
        x = jax.random.normal(jax.random.key(0), (10_000, k))
        w = jax.random.normal(jax.random.key(1), (k, 100))
        mm = lambda x, w: jnp.tanh(x @ w)  # noqa: E731
        fi = lambda x, w: jnp.tanh(networks.few_inputs_dot(x, w, dims))  # noqa: E731
        grad = lambda f: jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)))  # noqa: E731
        rows.append({"inputs": k, "matmul_ms": best_ms(jax.jit(mm), x, w, calls=calls),
                     "few_inputs_dot_ms": best_ms(jax.jit(fi), x, w, calls=calls),
                     "matmul_grad_ms": best_ms(grad(mm), x, w, calls=calls),
                     "few_inputs_dot_grad_ms": best_ms(grad(fi), x, w, calls=calls)})
    return rows


def softplus(calls: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (1_000_000,)) * 5
    log1p = jax.jit(lambda x: jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x))))
    dense = np.linspace(-40, 40, 200_001).astype(np.float32)
    ours = np.asarray(jax.jit(dists.softplus)(dense), np.float64)
    err = np.max(np.abs(ours - np.logaddexp(0.0, dense.astype(np.float64))))
    err_vs_log1p = np.max(np.abs(ours - np.asarray(log1p(dense), np.float64)))
    return {"values": x.size, "log1p_ms": best_ms(log1p, x, calls=calls),
            "library_log_ms": best_ms(jax.jit(dists.softplus), x, calls=calls),
            "jax_nn_softplus_ms": best_ms(jax.jit(jax.nn.softplus), x, calls=calls),
            "library_max_abs_error_vs_float64": float(err), "library_max_abs_difference_vs_log1p": float(err_vs_log1p)}


def step_kernels() -> dict:
    from dlvm_jax.models.vae import VAE, VAEConfig
    from dlvm_jax.objectives import elbo_terms, make_loss
    from dlvm_jax.train import init_state, make_train_step

    model = VAE(VAEConfig())
    x = jnp.asarray((np.random.default_rng(0).random((100, 784)) < 0.13).astype(np.float32))
    opt = optax.adam(1e-3)
    state = init_state(jax.jit(model.init)(jax.random.key(0)), opt, jax.random.key(1))

    def per_example_keys(params, batch, key, step):  # make_loss before 2026-12-02: one key per example
        keys = jax.random.split(key, batch.shape[0])
        terms = jax.vmap(lambda xi, k: elbo_terms(model, params, xi, k))(batch, keys)
        loss = -jnp.mean(terms["elbo"])
        return loss, {"loss": loss}

    out, runs = {}, {}
    for name, loss_fn in (("one key per example", per_example_keys), ("batch noise (make_loss)", make_loss(model))):
        step = make_train_step(loss_fn, opt)
        text = step.lower(state, x).compile().as_text()
        entry = text[text.index("ENTRY"):]
        ops = [m.group(1) for m in re.finditer(r"= \S+ ([\w-]+)\(", entry)]
        ops = [o for o in ops if o not in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple")]
        out[name] = {"top_level_ops": len(ops), "while_loops": len(re.findall(r" while\(", text))}
        box = [init_state(jax.tree.map(jnp.copy, state.params), opt, jax.random.key(1))]

        def run(step=step, box=box):
            box[0], metrics = step(box[0], x)
            return jax.block_until_ready(metrics)

        run()
        runs[name] = run
    times = {name: [] for name in runs}
    for _ in range(5):  # interleaved, so that a slow spell of the machine hits both
        for name, run in runs.items():
            times[name].append(1e3 * time_calls(run, calls=200, repeats=1)[0])
    for name in runs:
        out[name]["step_ms_best_of_5"] = round(min(times[name]), 4)
        out[name]["step_ms_median_of_5"] = round(float(np.median(times[name])), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS / "profile_small_ops.json"))
    args = ap.parse_args(argv)
    res = {"machine": machine(), "short_axis_sums": short_axis_sums(args.calls),
           "few_input_dense": few_input_dense(args.calls), "softplus": softplus(args.calls),
           "mlp_vae_step_kernels": step_kernels()}
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
