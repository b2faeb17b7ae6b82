"""The library's train steps and IS estimate with each of XLA:CPU's two libraries for matrix products.

    python -m benchmarks.profile_dots [--rounds 8] [--out benchmarks/results/profile_dots.json]

In jaxlib 0.10.2 XLA's CPU backend runs each dot as a YNNPACK fusion by default; with the compiler option
``xla_cpu_experimental_ynn_fusion_type`` set empty it runs them as its own dot thunks, which call Eigen.
``dlvm_jax.runtime.tuned_jit`` times both at a computation's first call and keeps the faster (``CPU_DOTS =
"auto"``); this script compiles each setting both ways (``CPU_DOTS`` fixed to ``"ynnpack"`` and to ``"eigen"``)
in one process and times them in alternating rounds (reversed order every other round, so that a slow spell of a
shared host falls on both), milliseconds a step or call, medians over the rounds:

* the train steps of ``python -m benchmarks`` (``make_train_step``, Adam, random binary images or spiral points):
  the MLP VAE at M=1 and M=10 (batch 100), the conv VAE at M=1 in microbatches of 10 (batch 100), the GMVAE at
  M=1 and M=10 (batch 200);
* the MLP VAE's IS estimate (``make_batch_estimator``, K=5000 in chunks of 100) of a batch of 100 images.

The ratio is YNNPACK's time over Eigen's: above 1, Eigen's is faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import worker  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from benchmarks.profile_train import alternate  # noqa: E402
from dlvm_jax import runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("ynnpack", "eigen")
#: (name, model, M, batch, microbatch)
STEPS = (("MLP VAE, M=1", "mlp_vae", 1, 100, 0), ("MLP VAE, M=10", "mlp_vae", 10, 100, 0),
         ("conv VAE, M=1, microbatches of 10", "conv_vae", 1, 100, 10),
         ("GMVAE, M=1", "gmvae", 1, 200, 0), ("GMVAE, M=10", "gmvae", 10, 200, 0))


def batch_for(model: str, size: int) -> jax.Array:
    rng = np.random.default_rng(0)
    if model == "gmvae":
        return jnp.asarray(rng.standard_normal((size, 2)), jnp.float32)
    shape = (size, 28, 28, 1) if model == "conv_vae" else (size, 784)
    return jnp.asarray(rng.random(shape) < 0.3, jnp.float32)


def with_library(library: str, first_call: Callable[[], Any]) -> Any:
    """``first_call()`` (which compiles a ``tuned_jit``) with ``runtime.CPU_DOTS`` fixed to ``library``."""
    saved = runtime.CPU_DOTS
    runtime.CPU_DOTS = library
    try:
        return first_call()
    finally:
        runtime.CPU_DOTS = saved


def stepping(model_name: str, samples: int, size: int, microbatch: int, library: str) -> Callable[[], None]:
    from dlvm_jax.objectives import microbatched
    from dlvm_jax.train import init_state, make_train_step

    model, loss_fn = worker._jax_model(model_name, samples)
    if microbatch:
        loss_fn = microbatched(loss_fn, microbatch)
    opt = optax.adam(1e-3)
    batch = batch_for(model_name, size)
    step = make_train_step(loss_fn, opt)
    run = worker._jax_stepping(step, init_state(jax.jit(model.init)(jax.random.key(0)), opt, jax.random.key(1)),
                               batch)
    with_library(library, lambda: run(1))
    if step.dot_library != library:
        raise RuntimeError(f"step compiled with {step.dot_library}, not {library}")
    return lambda: run(1)


def estimating(library: str, num_samples: int = 5000) -> Callable[[], None]:
    from dlvm_jax.likelihood import make_batch_estimator

    model, _ = worker._jax_model("mlp_vae", 1)
    params = jax.jit(model.init)(jax.random.key(0))
    estimate = make_batch_estimator(model, num_samples=num_samples, chunk_size=100)
    batch = batch_for("mlp_vae", 100)

    def run() -> None:
        jax.block_until_ready(estimate(params, batch, jax.random.key(2)))

    with_library(library, run)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_dots", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds of timed calls (8)")
    ap.add_argument("--out", default=str(RESULTS / "profile_dots.json"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if jax.default_backend() != "cpu":
        ap.error("XLA:CPU's dot libraries: run it on a CPU (JAX_PLATFORMS=cpu)")
    rows = []
    settings: list[tuple[str, Callable[[str], Callable[[], None]], float]] = [
        (name, lambda lib, m=m, s=s, b=b, mb=mb: stepping(m, s, b, mb, lib), 0.3) for name, m, s, b, mb in STEPS]
    settings.append(("MLP VAE, IS of 100 images, K=5000", estimating, 0.0))
    for name, build, seconds in settings:
        runs = {lib: build(lib) for lib in LIBRARIES}
        ms = alternate(runs, {lib: 1 for lib in LIBRARIES}, args.rounds, seconds=seconds)
        ratio = ms["ynnpack"] / ms["eigen"]
        rows.append({"setting": name, "ms_ynnpack": ms["ynnpack"], "ms_eigen": ms["eigen"],
                     "ynnpack_over_eigen": ratio})
        print(f"{name:<40} YNNPACK {ms['ynnpack']:9.3f} ms   Eigen {ms['eigen']:9.3f} ms   "
              f"YNNPACK / Eigen {ratio:.3f}", flush=True)
    write_result(args.out, {"rounds": args.rounds, "unit": "milliseconds a step or call, median over rounds",
                            "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
