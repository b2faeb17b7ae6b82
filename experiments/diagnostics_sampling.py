"""Naive Monte Carlo from the prior against importance sampling from q for log p(x), as K grows from 1 to 10^5.

    python experiments/diagnostics_sampling.py [--data-dir DIR] [--max-k 100000] [--mnist-images 10] [--repeats 2]

    naive:  log (1/K) sum_k p(x | z_k),                          z_k ~ p(z)
    IS:     log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),      z_k ~ q(z | x)

Both are unbiased for p(x), so both are stochastic lower bounds of log p(x) that converge as K grows; they differ in
how fast. For each data point, --repeats independent runs of --max-k log-weights are drawn per estimator; the estimate
for a given K is computed on every disjoint block of K consecutive weights (max-k / K blocks per run, so many
independent replicates for small K and --repeats for the largest). Reported per K: the mean over points of the
estimate's error (mean over replicates minus the truth) and of its spread (standard deviation over replicates).

Linear-Gaussian model (5-d x, 2-d z; the crude default encoder as q): the truth is the exact log p(x), on --lg-points
points. MNIST (the VAE of diagnostics_vae.py, --mnist-images binarized test images): no exact value; the reference is
the IS estimate from all --repeats x --max-k samples of q.

Writes --out (default experiments/results/diagnostics_sampling.json) and <stem>.png.
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

from diagnostics_vae import RESULTS, add_common_arguments, load_vae, machine, test_subset
from dlvm_jax import likelihood
from dlvm_jax.models import LinearGaussian, LinearGaussianConfig


def k_grid(max_k: int) -> list[int]:
    ks = [10**i for i in range(int(math.log10(max_k)) + 1)]
    return ks if ks[-1] == max_k else ks + [max_k]


def draw_log_weights(model, params, x: np.ndarray, key: jax.Array, *, num: int, repeats: int, chunk: int,
                     batch: int, progress: bool, label: str) -> dict[str, np.ndarray]:
    """{"q": (N, repeats, num), "prior": (N, repeats, num)} log-weights, float32."""
    out = {}
    for proposal in ("q", "prior"):
        fn = jax.jit(lambda p, xb, k, proposal=proposal: jax.vmap(
            lambda xi, ki: likelihood.chunked_log_weights(model, p, xi, ki, num, chunk, proposal=proposal))(
                xb, jax.random.split(k, xb.shape[0])))
        rows = []
        for r in tqdm(range(repeats), desc=f"{label}: {proposal}", disable=not progress, leave=False):
            parts = [np.asarray(fn(params, jnp.asarray(x[i:i + batch]), jax.random.fold_in(
                jax.random.fold_in(key, r), i))) for i in range(0, x.shape[0], batch)]
            rows.append(np.concatenate(parts))
        out[proposal] = np.stack(rows, axis=1)
        key = jax.random.fold_in(key, 10**6)
    return out


def summarise(log_w: dict[str, np.ndarray], truth: np.ndarray, ks: list[int]) -> dict:
    """Per K and proposal: mean error over points, mean spread over points, replicates per point."""
    res: dict = {}
    for proposal, lw in log_w.items():
        rows = []
        for k in ks:
            est = np.asarray(likelihood.block_estimates(jnp.asarray(lw), k), np.float64)  # (N, R, blocks)
            est = est.reshape(est.shape[0], -1)
            err = est.mean(1) - truth
            spread = float(est.std(1, ddof=1).mean()) if est.shape[1] > 1 else None  # None: a single replicate
            rows.append({"k": k, "replicates": int(est.shape[1]), "mean_error": float(err.mean()),
                         "mean_abs_error": float(np.abs(err).mean()), "mean_spread": spread,
                         "mean_estimate": float(est.mean())})
        res[proposal] = rows
    return res


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("linear_gaussian", "mnist") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(5.6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = result[part]
        for proposal, label, c in (("prior", "naive MC, z ~ p(z)", "C3"), ("q", "IS, z ~ q(z|x)", "C0")):
            rows = r["by_k"][proposal]
            k = np.array([row["k"] for row in rows])
            err = np.array([row["mean_error"] for row in rows])
            sd = np.array([row["mean_spread"] for row in rows], dtype=float)  # None -> nan
            ax.plot(k, err, "o-", color=c, label=label)
            ax.fill_between(k, err - np.nan_to_num(sd), err + np.nan_to_num(sd), color=c, alpha=0.2)
        ax.axhline(0.0, color="k", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("K (samples)")
        ax.set_ylabel("estimate - " + ("exact log p(x)" if part == "linear_gaussian" else "reference") + " (nats)")
        ax.set_title(f"{r['title']} ({r['num_points']} points)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--max-k", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=2, help="independent runs of --max-k weights per point")
    ap.add_argument("--lg-points", type=int, default=50)
    ap.add_argument("--lg-repeats", type=int, default=4)
    ap.add_argument("--mnist-images", type=int, default=10, help="test images (0: skip MNIST)")
    ap.add_argument("--chunk", type=int, default=1000, help="samples per vectorised chunk")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "diagnostics_sampling.json"))
    args = ap.parse_args(argv)
    if args.max_k < 10 or args.repeats < 1:
        raise SystemExit("diagnostics_sampling: --max-k must be >= 10 and --repeats >= 1")
    ks = k_grid(args.max_k)
    t0 = time.perf_counter()
    result: dict = {"k": ks, "max_k": args.max_k}

    lg = LinearGaussian(LinearGaussianConfig(data_dim=5, latent_dim=2))
    lg_params = jax.jit(lg.init)(jax.random.key(0))
    x = np.asarray(jax.jit(lg.sample_data, static_argnums=2)(lg_params, jax.random.key(1), args.lg_points))
    exact = np.asarray(jax.jit(jax.vmap(lg.exact_log_prob, in_axes=(None, 0)))(lg_params, x), np.float64)
    lw = draw_log_weights(lg, lg_params, x, jax.random.key(args.seed), num=args.max_k, repeats=args.lg_repeats,
                          chunk=args.chunk, batch=args.lg_points, progress=args.progress, label="linear-Gaussian")
    result["linear_gaussian"] = {"title": "Linear-Gaussian (exact log p(x))", "num_points": args.lg_points,
                                 "repeats": args.lg_repeats, "mean_exact_log_px": float(exact.mean()),
                                 "by_k": summarise(lw, exact, ks)}
    if args.mnist_images > 0:
        model, params, record = load_vae(args.params, args.record, "diagnostics_sampling")
        xm, rows = test_subset(args.data_dir, args.mnist_images, args.subset_seed, "diagnostics_sampling")
        lw = draw_log_weights(model, params, xm, jax.random.key(args.seed + 1), num=args.max_k, repeats=args.repeats,
                              chunk=args.chunk, batch=min(args.mnist_images, 5), progress=args.progress,
                              label="MNIST")
        all_q = lw["q"].reshape(lw["q"].shape[0], -1).astype(np.float64)
        reference = np.log(np.mean(np.exp(all_q - all_q.max(1, keepdims=True)), 1)) + all_q.max(1)
        ess = np.asarray(likelihood.weight_statistics(jnp.asarray(all_q, jnp.float32)).ess)
        result["mnist"] = {"title": "MNIST VAE (reference: IS, all samples)", "num_points": int(xm.shape[0]),
                           "rows": rows.tolist(), "repeats": args.repeats,
                           "reference": f"IS from q with {args.repeats} x {args.max_k} samples",
                           "mean_reference_log_px": float(reference.mean()),
                           "reference_ess_mean": float(ess.mean()), "by_k": summarise(lw, reference, ks),
                           "vae_epochs": record["training"]["epochs_run"]}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"] = machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    figure(result, out.with_suffix(".png"))
    for part in ("linear_gaussian", "mnist"):
        if part not in result:
            continue
        print(f"{result[part]['title']}: mean error (spread) of the estimate, nats")
        print(f"{'K':>8}{'naive (prior)':>24}{'IS (q)':>22}")
        def sd(v):
            return "      -" if v is None else f"{v:7.3f}"

        for a, b in zip(result[part]["by_k"]["prior"], result[part]["by_k"]["q"]):
            print(f"{a['k']:8d}{a['mean_error']:14.3f} ({sd(a['mean_spread'])}){b['mean_error']:12.3f} "
                  f"({sd(b['mean_spread'])})")
    print(f"{result['seconds']:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
