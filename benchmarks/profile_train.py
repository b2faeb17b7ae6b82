"""Where the time of one MLP VAE train step goes (batch 100, ELBO with one sample, Adam), in JAX.

    python -m benchmarks.profile_train [--samples 1] [--rounds 8] [--out benchmarks/results/profile_train.json]

Two tables, milliseconds per step or call, each the median of ``--rounds`` rounds of timed calls (the variants
alternate within every round, in reversed order every other round, so that a slow spell of a shared host falls on
all of them alike):

* parts: the library's jitted train step (``make_train_step``, what ``python -m benchmarks`` times), the gradient
  of the loss alone, the loss alone, the Adam update alone, and the bare network: the same six weight matrices
  without biases, activations, sampling or likelihood, forward and backward (the matmuls of a step). The step
  less the bare matmuls is the cost of everything else; the compiled step's kernel count is recorded too (each fused
  kernel is one call into XLA's CPU runtime).
* ablations (``--samples 1`` only): the same step written out plainly (``jnp`` ops, ``jax.value_and_grad``, Adam;
  its loss is checked against the library's), then without one piece each: Adam (plain SGD), the sampling (zero
  noise), the likelihood's softplus (a linear stand-in, not the same model: a cost probe); a step that only passes
  the state through (the cost of a dispatch); the library's scanned epoch (``make_epoch``, what ``fit`` runs for
  MLP models), per step; and the library's step compiled with XLA options: copy insertion by region analysis
  (which removes the copies of the parameters that the in-place update makes) and 512-bit vectors.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import flops  # noqa: E402
from benchmarks.common import write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: XLA compiler options tried on the library's step (per compilation, ``jax.jit(..., compiler_options=...)``).
XLA_OPTIONS = {
    "copy insertion by region analysis": {"xla_cpu_copy_insertion_use_region_analysis": True},
    "512-bit vectors": {"xla_cpu_prefer_vector_width": 512},
}


def kernel_count(compiled_text: str) -> dict[str, int]:
    entry = compiled_text[compiled_text.index("ENTRY"):]
    kinds: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        m = re.search(r"= \S+ ([\w-]+)\(", line)
        if m and m.group(1) not in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
            kinds[m.group(1)] = kinds.get(m.group(1), 0) + 1
    return kinds


def alternate(runs: dict[str, Callable[[], None]], per_call: dict[str, int], rounds: int,
              seconds: float = 0.3) -> dict[str, float]:
    """Median milliseconds per unit (a call, or ``per_call[name]`` steps a call) of each ``runs[name]()`` (which
    must block until its work is done), over ``rounds`` rounds in which every run takes its turn for about
    ``seconds``; the order reversed every other round."""
    calls = {}
    for name, run in runs.items():
        run()
        t = time.perf_counter()
        run()
        calls[name] = max(2, int(seconds / max(time.perf_counter() - t, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t = time.perf_counter()
            for _ in range(calls[name]):
                runs[name]()
            times[name].append(1e3 * (time.perf_counter() - t) / (calls[name] * per_call.get(name, 1)))
    return {name: statistics.median(v) for name, v in times.items()}


def plain_loss(params: Any, x: jax.Array, noise: jax.Array, *, softplus_likelihood: bool = True) -> jax.Array:
    """The MLP VAE's negative ELBO (analytic KL, one sample), batch mean, written out in ``jnp``: tanh MLPs,
    std = softplus(raw) + 1e-3, Bernoulli log-likelihood x l - softplus(l). ``softplus_likelihood=False`` puts
    l in place of softplus(l) (a cost probe, not a likelihood)."""
    from dlvm_jax.distributions import MIN_SCALE, softplus

    def mlp(layers: dict[str, Any], h: jax.Array) -> jax.Array:
        names = sorted(layers)
        for name in names[:-1]:
            h = jnp.tanh(h @ layers[name]["kernel"] + layers[name]["bias"])
        return h @ layers[names[-1]]["kernel"] + layers[names[-1]]["bias"]

    out = mlp(params["encoder"], x)
    latent = out.shape[-1] // 2
    mean, std = out[:, :latent], softplus(out[:, latent:]) + MIN_SCALE
    logits = mlp(params["decoder"], mean + std * noise)
    rec = jnp.sum(x * logits - (softplus(logits) if softplus_likelihood else logits), axis=-1)
    kl = jnp.sum(0.5 * (mean**2 + std**2 - 1.0) - jnp.log(std), axis=-1)
    return -jnp.mean(rec - kl)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M (1: ELBO; more: IWAE)")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds of timed calls (8)")
    ap.add_argument("--out", default=str(RESULTS / "profile_train.json"))
    args = ap.parse_args(argv)

    from dlvm_jax.models.vae import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss
    from dlvm_jax.train import TrainState, _step, init_state, make_epoch, make_train_step

    batch, m = 100, args.samples
    model = VAE(VAEConfig())
    loss_fn = make_loss(model, objective="elbo" if m == 1 else "iwae", num_samples=m)
    x = jnp.asarray((np.random.default_rng(0).random((batch, 784)) < 0.13).astype(np.float32))
    opt = optax.adam(1e-3)
    params = jax.jit(model.init)(jax.random.key(0))
    key = jax.random.key(2)
    step0 = jnp.asarray(0)
    fresh = lambda optimizer=opt: init_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(1))  # noqa: E731

    step = make_train_step(loss_fn, opt)
    kernels = kernel_count(step.lower(fresh(), x).compile().as_text())
    states: dict[str, Any] = {}

    def stepping(name: str, fn: Callable, batch_arg: jax.Array = x, optimizer=opt) -> Callable[[], None]:
        states[name] = fresh(optimizer)

        def run() -> None:
            states[name], metrics = fn(states[name], batch_arg)
            jax.block_until_ready(metrics)

        return run

    loss_only = jax.jit(lambda p: loss_fn(p, x, key, step0)[0])
    grad_only = jax.jit(jax.grad(lambda p: loss_fn(p, x, key, step0)[0]))
    grads = grad_only(params)
    opt_state = opt.init(params)
    update = jax.jit(lambda g, s, p: optax.apply_updates(p, opt.update(g, s, p)[0]))
    weights = [params[net][f"Dense_{i}"]["kernel"] for net in ("encoder", "decoder") for i in range(3)]
    latent = model.config.latent_dim

    def bare(ws, x):
        h = x @ ws[0] @ ws[1] @ ws[2]
        z = jnp.broadcast_to(h[:, :latent], (m,) + h[:, :latent].shape).reshape(-1, latent)
        return jnp.sum(z @ ws[3] @ ws[4] @ ws[5])

    bare_grad = jax.jit(jax.grad(bare))
    parts = alternate({
        "train step (library)": stepping("library", step),
        "gradient of the loss": lambda: jax.block_until_ready(grad_only(params)),
        "loss alone": lambda: jax.block_until_ready(loss_only(params)),
        "Adam update alone": lambda: jax.block_until_ready(update(grads, opt_state, params)),
        "bare network, forward + backward (the matmuls)": lambda: jax.block_until_ready(bare_grad(weights, x)),
    }, {}, args.rounds)
    gflop = flops.train_step_flops("mlp_vae", batch, m) / 1e9
    bare_ms = parts["bare network, forward + backward (the matmuls)"]
    out: dict[str, Any] = {
        "batch": batch, "num_samples": m, "gflop_per_step": gflop, "rounds": args.rounds,
        "ms": {k: round(v, 3) for k, v in parts.items()},
        "bare_matmul_gflops": round(gflop / bare_ms * 1e3, 1),
        "step_gflops": round(gflop / parts["train step (library)"] * 1e3, 1),
        "compiled_step_kernels": kernels}
    for k, v in parts.items():
        print(f"{k:<56} {v:8.3f} ms")

    if m == 1:
        # the library draws the batch's noise as normal(key, (batch, M, latent)); the same noise, written out
        library_loss = float(loss_fn(params, x, key, step0)[0])
        written_loss = float(plain_loss(params, x, jax.random.normal(key, (batch, 1, latent))[:, 0]))
        if not np.isclose(library_loss, written_loss, rtol=1e-5):
            raise AssertionError(f"the written-out loss {written_loss} is not the library's {library_loss}")

        def plain_step(optimizer=opt, sampling: bool = True, softplus_likelihood: bool = True) -> Callable:
            def one(state: TrainState, b: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
                key, step_key = jax.random.split(state.key)
                eps = jax.random.normal(step_key, (b.shape[0], latent)) if sampling else jnp.zeros((b.shape[0], latent))
                value, g = jax.value_and_grad(plain_loss)(state.params, b, eps,
                                                          softplus_likelihood=softplus_likelihood)
                updates, new_opt = optimizer.update(g, state.opt_state, state.params)
                return TrainState(optax.apply_updates(state.params, updates), new_opt, key, state.step + 1), {
                    "loss": value}
            return jax.jit(one, donate_argnums=0)

        def pass_through(state: TrainState, b: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
            return state._replace(step=state.step + 1), {"loss": b[0, 0]}

        epoch_batches = 60
        data = jnp.asarray((np.random.default_rng(1).random((epoch_batches * batch, 784)) < 0.13).astype(np.float32))
        sgd = optax.sgd(1e-3)
        runs = {
            "library step": stepping("library step", step),
            "written-out step": stepping("written", plain_step()),
            "written-out, SGD instead of Adam": stepping("sgd", plain_step(sgd), optimizer=sgd),
            "written-out, no sampling (zero noise)": stepping("no noise", plain_step(sampling=False)),
            "written-out, linear stand-in for the softplus": stepping("linear", plain_step(softplus_likelihood=False)),
            "dispatch only (state passed through)": stepping("dispatch", jax.jit(pass_through, donate_argnums=0)),
            "library scanned epoch (fit), per step": stepping("epoch", make_epoch(loss_fn, opt, batch_size=batch),
                                                               batch_arg=data),
        }
        for label, options in XLA_OPTIONS.items():
            compiled = jax.jit(lambda s, b: _step(loss_fn, opt, s, b), donate_argnums=0, compiler_options=options)
            runs[f"library step, XLA: {label}"] = stepping(label, compiled)
        ablations = alternate(runs, {"library scanned epoch (fit), per step": epoch_batches}, args.rounds)
        out["ablations_ms"] = {k: round(v, 3) for k, v in ablations.items()}
        out["written_out_loss_check"] = {"library": library_loss, "written_out": written_loss}
        print()
        for k, v in ablations.items():
            print(f"{k:<56} {v:8.3f} ms")
    print(f"{gflop:.3f} GFLOP per step: {out['step_gflops']} GFLOP/s for the step, "
          f"{out['bare_matmul_gflops']} GFLOP/s for the bare matmuls; compiled step kernels {kernels}")
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
