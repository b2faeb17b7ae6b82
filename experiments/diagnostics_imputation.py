"""Imputation of the top half of binarized MNIST test digits with the trained VAE: importance resampling from q and
Metropolis-within-Gibbs (Mattei & Frellsen 2018), against mean imputation.

    python experiments/diagnostics_imputation.py [--data-dir DIR] [--num-images 500] [--is-samples 10000]
                                                 [--mwg-steps 5000] [--burn-in 500]

The top 14 rows (392 pixels) of each image are unobserved. The encoder sees the image with its missing pixels set
to the mean training image (``--fill mean``; ``zero`` sets them to 0); every weight and acceptance ratio uses only
the observed pixels' likelihood (dlvm_jax.inference.impute_importance, impute_mwg). Single imputations: the
self-normalised IS estimate of E[x_m | x_o] (K = --is-samples), and the Metropolis-within-Gibbs average of
E[x_m | z_t] over the steps after burn-in. Baselines: every missing pixel set to its mean over the training images
(mean imputation), and one pass of the encoder (the decoder's mean at the mean of q(z | x_o, fill)).

Errors on the missing pixels, per image then averaged (standard error over images): squared error of the imputed
probability (Brier score), error rate of the imputation thresholded at 1/2, and the cross-entropy of the true pixel
under the imputed probability. Writes --out (default experiments/results/diagnostics_imputation.json) and
<stem>.png (digits, observed halves, imputations, Metropolis-within-Gibbs draws).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diagnostics_vae import RESULTS, add_common_arguments, load_vae, machine, test_subset, train_images
from dlvm_jax import inference as inf
from dlvm_jax import plots

SIDE = 28
MISSING_ROWS = 14


def top_half_missing() -> np.ndarray:
    """Boolean mask of the 784 pixels, True where observed (the bottom 14 rows)."""
    return np.arange(SIDE * SIDE) >= MISSING_ROWS * SIDE


def errors(imputed: np.ndarray, x: np.ndarray, missing: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image errors on the missing pixels."""
    p = np.clip(imputed[:, missing].astype(np.float64), 1e-6, 1 - 1e-6)
    t = x[:, missing].astype(np.float64)
    return {"squared_error": np.mean((p - t) ** 2, axis=1),
            "error_rate": np.mean((p > 0.5) != (t > 0.5), axis=1),
            "cross_entropy": -np.mean(t * np.log(p) + (1 - t) * np.log1p(-p), axis=1)}


def run_batched(fn, params, x: np.ndarray, observed: np.ndarray, key: jax.Array, batch: int, desc: str,
                progress: bool) -> inf.Imputation:
    parts = []
    for i in tqdm(range(0, x.shape[0], batch), desc=desc, disable=not progress, leave=False):
        xb = x[i:i + batch]
        real = xb.shape[0]
        if real < batch:
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch - real, axis=0)])
        out = fn(params, jnp.asarray(xb), jnp.asarray(observed), jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda a, r=real: np.asarray(a[:r]), out))
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--num-images", type=int, default=500, help="test images (a fixed random subset)")
    ap.add_argument("--is-samples", type=int, default=10000, help="K, importance samples per image")
    ap.add_argument("--mwg-steps", type=int, default=5000)
    ap.add_argument("--burn-in", type=int, default=500)
    ap.add_argument("--fill", choices=("mean", "zero"), default="mean",
                    help="what the encoder sees in the missing pixels")
    ap.add_argument("--batch", type=int, default=50, help="images per jitted call")
    ap.add_argument("--figure-images", type=int, default=10)
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "diagnostics_imputation.json"))
    args = ap.parse_args(argv)
    model, params, record = load_vae(args.params, args.record, "diagnostics_imputation")
    x, rows = test_subset(args.data_dir, args.num_images, args.subset_seed, "diagnostics_imputation")
    pixel_means = train_images(args.data_dir, "diagnostics_imputation").mean(0).astype(np.float32)
    observed = top_half_missing()
    missing = ~observed
    fill = pixel_means if args.fill == "mean" else np.zeros_like(pixel_means)
    k_is, k_mwg = jax.random.split(jax.random.key(args.seed))
    batch = min(args.batch, x.shape[0])
    t0 = time.perf_counter()
    is_fn = inf.make_imputer(model, "importance", num_samples=args.is_samples, num_draws=3, fill=jnp.asarray(fill))
    is_batch = max(1, min(batch, 200_000 // args.is_samples))  # K x 784 probabilities per image in memory
    imp_is = run_batched(is_fn, params, x, observed, k_is, is_batch, "importance", args.progress)
    t_is = time.perf_counter() - t0
    mwg_fn = inf.make_imputer(model, "mwg", steps=args.mwg_steps, burn_in=args.burn_in, num_draws=3,
                              fill=jnp.asarray(fill))
    imp_mwg = run_batched(mwg_fn, params, x, observed, k_mwg, batch, "Metropolis-within-Gibbs", args.progress)
    t_mwg = time.perf_counter() - t0 - t_is
    one_pass = np.asarray(jax.jit(jax.vmap(lambda xi: model.reconstruct(params, xi)))(
        jnp.asarray(np.where(observed, x, fill))))
    methods = {
        "mean imputation": np.where(observed, x, pixel_means),
        "encoder, one pass": np.where(observed, x, one_pass),
        "importance sampling": imp_is.mean,
        "Metropolis-within-Gibbs": imp_mwg.mean,
    }
    unchanged = {name: bool(np.array_equal(v[:, observed], x[:, observed])) for name, v in methods.items()}
    unchanged["importance draws"] = bool(np.all(imp_is.draws[:, :, observed] == x[:, None, observed]))
    unchanged["Metropolis-within-Gibbs draws"] = bool(np.all(imp_mwg.draws[:, :, observed] == x[:, None, observed]))
    table = {}
    n = x.shape[0]
    for name, imputed in methods.items():
        errs = errors(imputed, x, missing)
        table[name] = {k: {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(n))}
                       for k, v in errs.items()}
    result = {
        "setting": {"num_images": int(n), "rows": rows.tolist(), "missing": "top 14 rows (392 of 784 pixels)",
                    "fill": args.fill, "is_samples": args.is_samples, "mwg_steps": args.mwg_steps,
                    "burn_in": args.burn_in, "vae_epochs": record["training"]["epochs_run"],
                    "vae_test_elbo": record["final_test_elbo"]},
        "errors_on_missing_pixels": table,
        "observed_pixels_unchanged": unchanged,
        "importance_ess": {"mean": float(imp_is.diagnostic.mean()), "median": float(np.median(imp_is.diagnostic)),
                           "of": args.is_samples},
        "mwg_acceptance": {"mean": float(imp_mwg.diagnostic.mean()), "min": float(imp_mwg.diagnostic.min()),
                           "max": float(imp_mwg.diagnostic.max())},
        "seconds": {"importance": round(t_is, 1), "mwg": round(t_mwg, 1)},
        "machine": machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    m = min(args.figure_images, n)
    shown_obs = np.where(observed, x[:m], 0.5)
    grid = np.concatenate([x[:m], shown_obs, methods["mean imputation"][:m], methods["importance sampling"][:m],
                           methods["Metropolis-within-Gibbs"][:m], imp_is.draws[:m, 0], imp_mwg.draws[:m, 0],
                           imp_mwg.draws[:m, 1]])
    plots.image_grid(grid, out.with_suffix(".png"), "Top half unobserved: imputations by the MNIST VAE", ncols=m,
                     row_labels=["data", "observed", "mean imp.", "IS mean", "MwG mean", "IS draw", "MwG draw",
                                 "MwG draw"])
    print(f"{n} test images, top half missing; errors on the missing pixels (s.e.)")
    print(f"{'method':>26}{'squared error':>20}{'error rate':>20}{'cross-entropy':>20}")
    for name, r in table.items():
        print(f"{name:>26}" + "".join(f"{r[k]['mean']:12.4f} ({r[k]['se']:.4f})"
                                      for k in ("squared_error", "error_rate", "cross_entropy")))
    print(f"ESS mean {result['importance_ess']['mean']:.1f} of {args.is_samples}; MwG acceptance "
          f"{result['mwg_acceptance']['mean']:.3f}; observed pixels unchanged: {all(unchanged.values())}; "
          f"IS {t_is:.0f} s, MwG {t_mwg:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
