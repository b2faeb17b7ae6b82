"""The train step's noise through ``jax.random`` and through ``dlvm_jax.noise`` (the same numbers, bit for bit).

    python -m benchmarks.profile_rng [--rounds 12] [--out benchmarks/results/profile_rng.json]

On XLA's CPU backend JAX lowers its Threefry hash as a rolled loop of five iterations; ``dlvm_jax.noise`` writes
the hash out. Two tables, microseconds a call (each call waited for), medians of ``--rounds`` alternating rounds
(reversed order every other round, so that a slow spell of a shared host falls on both):

* draws: the standard-normal noise of the MLP VAE's train step at M=1 and M=10 (batch 100, 50 latents), the
  importance sampler's K=5000 draws of one image, and the step's key split, each jitted alone;
* steps: the library's MLP VAE train step of ``python -m benchmarks`` (``make_train_step``, Adam, batch 100) at
  M=1 and M=10, compiled once with ``dlvm_jax.noise`` (the library) and once with ``jax.random`` in its place,
  in the same process; with each one's count of loops (``while``) and of kernels that compute the hash (XLA
  copies an elementwise chain into every kernel that reads it, so the unrolled hash can run more than once).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import write_result  # noqa: E402
from benchmarks.profile_train import alternate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def timed(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median microseconds a call of each, over alternating rounds (:func:`benchmarks.profile_train.alternate`,
    each call waited for)."""
    runs = {name: (lambda call=call: jax.block_until_ready(call())) for name, call in calls.items()}
    return {name: round(1e3 * ms, 1) for name, ms in alternate(runs, {}, rounds).items()}


@contextlib.contextmanager
def jax_random_noise() -> Iterator[None]:
    """Trace the library with ``jax.random``'s draws in place of ``dlvm_jax.noise``'s (an ablation)."""
    from dlvm_jax import noise

    saved = noise.normal, noise.split
    noise.normal = lambda key, shape=(), dtype=None: jax.random.normal(key, tuple(shape), dtype)
    noise.split = jax.random.split
    try:
        yield
    finally:
        noise.normal, noise.split = saved


def hash_kernels(compiled_text: str) -> int:
    """Kernels of a compiled computation that run the whole unrolled Threefry hash (20 rotations or more; the
    rolled loop's body, 4 rounds an iteration, does not count)."""
    return sum(1 for block in compiled_text.split("\n\n") if block.count("shift-left") >= 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default=str(RESULTS / "profile_rng.json"))
    args = ap.parse_args(argv)

    from dlvm_jax import noise
    from dlvm_jax.models.vae import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss
    from dlvm_jax.train import init_state, make_train_step

    key = jax.random.key(1)
    draws: dict[str, Any] = {}
    for label, shape in {"noise of a step, M=1 (100, 1, 50)": (100, 1, 50),
                         "noise of a step, M=10 (100, 10, 50)": (100, 10, 50),
                         "IS draws of one image, K=5000 (5000, 50)": (5000, 50)}.items():
        ours, theirs = jax.jit(lambda k, s=shape: noise.normal(k, s)), jax.jit(lambda k, s=shape: jax.random.normal(k, s))
        if not np.array_equal(np.asarray(ours(key)), np.asarray(theirs(key))):
            raise AssertionError(f"dlvm_jax.noise.normal differs from jax.random.normal at {shape}")
        t = timed({"jax.random": lambda f=theirs: f(key), "dlvm_jax.noise": lambda f=ours: f(key)}, args.rounds)
        draws[label] = {**t, "speedup": round(t["jax.random"] / t["dlvm_jax.noise"], 2)}
        print(f"{label:<44} jax.random {t['jax.random']:8.1f} us   dlvm_jax.noise {t['dlvm_jax.noise']:8.1f} us")
    ours, theirs = jax.jit(lambda k: noise.split(k)), jax.jit(lambda k: jax.random.split(k))
    t = timed({"jax.random": lambda: theirs(key), "dlvm_jax.noise": lambda: ours(key)}, args.rounds)
    draws["key split"] = {**t, "speedup": round(t["jax.random"] / t["dlvm_jax.noise"], 2)}
    print(f"{'key split':<44} jax.random {t['jax.random']:8.1f} us   dlvm_jax.noise {t['dlvm_jax.noise']:8.1f} us")

    model = VAE(VAEConfig())
    x = jnp.asarray((np.random.default_rng(0).random((100, 784)) < 0.13).astype(np.float32))
    params = jax.jit(model.init)(jax.random.key(0))
    opt = optax.adam(1e-3)
    steps: dict[str, Any] = {}
    for m in (1, 10):
        loss_fn = make_loss(model, objective="elbo" if m == 1 else "iwae", num_samples=m)
        states, fns, structure = {}, {}, {}
        for name in ("jax.random", "dlvm_jax.noise"):
            with jax_random_noise() if name == "jax.random" else contextlib.nullcontext():
                step = make_train_step(loss_fn, opt)
                state = init_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(1))
                text = step.lower(state, x).compile().as_text()
                states[name], _ = step(state, x)  # compiled here, inside the context
            fns[name] = step
            structure[name] = {"while_loops": text.count(" while("), "hash_kernels": hash_kernels(text)}

        def call(name: str) -> Callable[[], Any]:
            def run() -> Any:
                states[name], metrics = fns[name](states[name], x)
                return metrics
            return run

        t = timed({name: call(name) for name in fns}, args.rounds)
        steps[f"MLP VAE train step, M={m}"] = {
            name: {"us": t[name], "steps_per_s": round(1e6 / t[name], 1), **structure[name]} for name in fns}
        steps[f"MLP VAE train step, M={m}"]["speedup"] = round(t["jax.random"] / t["dlvm_jax.noise"], 3)
        print(f"MLP VAE train step, M={m:<2}  jax.random {t['jax.random']:8.1f} us  dlvm_jax.noise "
              f"{t['dlvm_jax.noise']:8.1f} us  ({t['jax.random'] / t['dlvm_jax.noise']:.3f}x; {structure})")
    write_result(args.out, {"rounds": args.rounds, "draws_us": draws, "steps": steps})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
