"""Where the time of the MLP VAE's importance-sampled log-likelihood goes, in JAX and in PyTorch.

    python -m benchmarks.profile_is [--rows 10000] [--out benchmarks/results/profile_is.json]

One chunk of the IS evaluation of the Bernoulli 784-200-200-50 VAE decodes ``rows`` latent samples (100 images x
100 samples in ``python -m benchmarks``). The chunk is timed cumulatively, piece by piece: the three matmuls
alone, the decoder network (bias and tanh added), then the decoder with the Bernoulli log-likelihood as dlvm_jax
computes it (distrax: log_sigmoid(l) x + log_sigmoid(-l) (1 - x), two softplus per pixel) and in the one-softplus
form x l - softplus(l) with softplus(l) = max(l, 0) + log1p(exp(-|l|)); finally the library's whole chunk
(``model.log_weights`` vmapped over the images). Each line gives milliseconds (best of 5) and the decoder's matmul
FLOPs per second over that time, against the float32 matmul peak measured here. XLA's cost analysis of the
library's chunk (FLOPs and transcendental functions) is recorded too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

OUT = Path(__file__).resolve().parent / "results" / "profile_is.json"


def best_of(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_is", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10000, help="decoded samples per chunk (100 images x 100)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks import torch_models as tm
    from benchmarks.common import write_result
    from benchmarks.worker import cores
    from dlvm_jax.models.vae import VAE, VAEConfig

    torch.set_num_threads(cores())
    n, images = args.rows, 100
    per_image = n // images
    model = VAE(VAEConfig())
    params = jax.jit(model.init)(jax.random.key(0))
    dec = params["decoder"]
    z = jax.random.normal(jax.random.key(1), (n, 50))
    x = (jax.random.uniform(jax.random.key(2), (784,)) < 0.13).astype(jnp.float32)
    xs = (jax.random.uniform(jax.random.key(3), (images, 784)) < 0.13).astype(jnp.float32)
    keys = jax.random.split(jax.random.key(4), images)
    matmul_flop = 2 * n * (50 * 200 + 200 * 200 + 200 * 784)

    def matmuls(z):
        h = z @ dec["Dense_0"]["kernel"]
        h = h @ dec["Dense_1"]["kernel"]
        return jnp.sum(h @ dec["Dense_2"]["kernel"], -1)

    def network(z):
        return jnp.sum(model.decoder.apply({"params": dec}, z), -1)

    def library_likelihood(z):
        return model.decode(params, z).log_prob(x)

    def one_softplus(z):
        logits = model.decoder.apply({"params": dec}, z)
        softplus = jnp.maximum(logits, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        return jnp.sum(x * logits - softplus, -1)

    def library_chunk(xs, keys):
        return jax.vmap(lambda xi, k: model.log_weights(params, xi, k, per_image))(xs, keys)

    a = jax.random.normal(jax.random.key(5), (2048, 2048))
    mm = jax.jit(lambda a: a @ a)
    jax_peak = 2 * 2048**3 / best_of(lambda: mm(a).block_until_ready())
    at = torch.randn(2048, 2048)
    torch_peak = 2 * 2048**3 / best_of(lambda: torch.mm(at, at))
    peak = max(jax_peak, torch_peak)

    rows: list[dict[str, Any]] = []

    def record(framework: str, what: str, seconds: float) -> None:
        rate = matmul_flop / seconds
        rows.append({"framework": framework, "what": what, "ms": round(1e3 * seconds, 2),
                     "matmul_gflops": round(rate / 1e9, 2), "fraction_of_matmul_peak": round(rate / peak, 4)})
        print(f"{framework:<6} {what:<58} {1e3 * seconds:9.1f} ms  {rate / 1e9:7.1f} GFLOP/s  "
              f"{100 * rate / peak:5.1f}% of peak", flush=True)

    print(f"{n} rows; float32 matmul peak: JAX {jax_peak / 1e9:.1f}, PyTorch {torch_peak / 1e9:.1f} GFLOP/s")
    for what, f in (("3 matmuls", matmuls), ("decoder network (+ bias, tanh)", network),
                    ("decoder + Bernoulli log p (distrax, library)", library_likelihood),
                    ("decoder + Bernoulli log p as x l - softplus(l)", one_softplus)):
        jf = jax.jit(f)
        record("jax", what, best_of(lambda: jf(z).block_until_ready()))
    lib = jax.jit(library_chunk)
    record("jax", "library chunk: vmap(model.log_weights) (+ encoder, q, prior)",
           best_of(lambda: lib(xs, keys).block_until_ready()))
    cost = lib.lower(xs, keys).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_cost = {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "transcendentals", "bytes accessed")}

    tmodel = tm.mlp_vae()
    zt, xt = torch.from_numpy(np.asarray(z)), torch.from_numpy(np.asarray(x))
    ws = [layer.weight.detach().T.contiguous() for layer in tmodel.decoder if isinstance(layer, torch.nn.Linear)]
    xst = torch.from_numpy(np.asarray(xs))
    with torch.inference_mode():
        record("torch", "3 matmuls", best_of(lambda: ((zt @ ws[0]) @ ws[1] @ ws[2]).sum(-1)))
        record("torch", "decoder network (+ bias, tanh)", best_of(lambda: tmodel.decoder(zt).sum(-1)))
        record("torch", "decoder + Bernoulli log p (torch.distributions)",
               best_of(lambda: tmodel.decode(zt).log_prob(xt)))
        record("torch", "whole chunk: model.log_weights (+ encoder, q, prior)",
               best_of(lambda: tmodel.log_weights(xst, per_image)))

    result = {"rows": n, "matmul_peak_gflops": {"jax": round(jax_peak / 1e9, 2), "torch": round(torch_peak / 1e9, 2)},
              "matmul_gflop_per_chunk": matmul_flop / 1e9, "xla_cost_analysis_library_chunk": xla_cost,
              "rows_timed": rows}
    print("XLA cost analysis of the library chunk:", xla_cost)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
