"""Amortisation and approximation gaps (Cremer, Li & Duvenaud 2018) of the MNIST VAE, beside their numbers.

    python experiments/diagnostics_gaps.py [--data-dir DIR] [--num-test 1000] [--is-samples 5000] [--steps 300]

Needs the VAE of experiments/diagnostics_vae.py (``--params``, ``--record``). On ``--num-test`` binarized MNIST test
images (a fixed random subset: K = 5000 on all 10,000 takes hours on 2 shared CPU cores), each point's factorised
Gaussian q is refined from the encoder's output (``--steps`` Adam steps, ``--refine-samples`` samples per step,
sticking-the-landing gradients; dlvm_jax.inference.make_refiner), then

    log p(x)   importance sampling, K = --is-samples from the amortised q(z | x), and from q* (both are
               stochastic lower bounds; the one from q* is the higher where the amortised q is a poor proposal),
    ELBO(q*)   the refined q, K samples,       approximation gap = log p(x) - ELBO(q*),
    ELBO(q)    the amortised q, K samples,     amortisation gap  = ELBO(q*) - ELBO(q).

A linear-Gaussian row (factor analysis, 5-d data, 2-d latent, the crude default encoder, full-covariance q) shows
the same pipeline where every quantity is known in closed form: the approximation gap there is exactly 0.

Writes --out (default experiments/results/diagnostics_gaps.json) and <stem>.png (per-image gaps, refinement
trace).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diagnostics_vae import RESULTS, add_common_arguments, load_vae, machine, test_subset
from dlvm_jax import distributions as dists
from dlvm_jax import inference as inf
from dlvm_jax.models import LinearGaussian, LinearGaussianConfig

#: Cremer, Li & Duvenaud 2018, MNIST, factorised Gaussian q (../shared/REFERENCES.md) [reported].
REFERENCE = {"log_px": -89.80, "elbo_refined": -90.80, "elbo_amortised": -91.23, "approximation_gap": 1.00,
             "amortisation_gap": 0.43, "source": "Cremer, Li & Duvenaud 2018, MNIST, factorised Gaussian q"}


def linear_gaussian_row(num_points: int, args: argparse.Namespace) -> dict:
    """The decomposition in closed form on the linear-Gaussian model (crude amortised q, refined full Gaussian)."""
    model = LinearGaussian(LinearGaussianConfig(data_dim=5, latent_dim=2))
    params = jax.jit(model.init)(jax.random.key(0))
    x = jax.jit(model.sample_data, static_argnums=2)(params, jax.random.key(1), num_points)
    refinement = inf.refine(model, params, x, jax.random.key(2), batch_size=num_points, progress=False,
                            steps=args.lg_steps, learning_rate=args.lr, num_samples=args.refine_samples)

    @jax.jit
    def closed_forms(params, x, vp):
        def one(xi, v):
            post = inf.linear_gaussian_posterior(model, params, xi)
            return (model.exact_log_prob(params, xi),
                    model.exact_log_prob(params, xi) - dists.kl_divergence(inf.variational_dist(v), post),
                    inf.linear_gaussian_elbo(model, params, xi))
        return jax.vmap(one)(x, vp)

    log_px, elbo_star, elbo_q = (np.asarray(a, np.float64) for a in closed_forms(params, x, refinement.params))
    return {"model": "linear-Gaussian (5-d x, 2-d z), crude amortised q, full-covariance q*; all values exact",
            "num_examples": num_points, "refine_steps": args.lg_steps, "refine_lr": args.lr, "log_px": log_px.mean(), "elbo_refined": elbo_star.mean(),
            "elbo_amortised": elbo_q.mean(), "approximation_gap": (log_px - elbo_star).mean(),
            "approximation_gap_max": (log_px - elbo_star).max(), "amortisation_gap": (elbo_star - elbo_q).mean()}


def figure(gaps: inf.Gaps, trace: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    approx = np.asarray(gaps.log_px - gaps.elbo_refined)
    approx_star = np.asarray(gaps.log_px_refined_q - gaps.elbo_refined)
    amort = np.asarray(gaps.elbo_refined - gaps.elbo_amortised)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    lo = np.percentile(np.concatenate([approx, approx_star, amort]), 0.5)
    hi = np.percentile(np.concatenate([approx, approx_star, amort]), 99.5)
    bins = np.linspace(min(lo, 0.0), hi, 40)
    axes[0].hist(approx, bins=bins, alpha=0.45, label=f"approximation gap, IS from q (mean {approx.mean():.2f})")
    axes[0].hist(approx_star, bins=bins, alpha=0.45,
                 label=f"approximation gap, IS from q* (mean {approx_star.mean():.2f})")
    axes[0].hist(amort, bins=bins, alpha=0.45, label=f"amortisation gap (mean {amort.mean():.2f})")
    axes[0].axvline(REFERENCE["approximation_gap"], color="C0", ls="--", lw=1, label="Cremer et al. approx. 1.00")
    axes[0].axvline(REFERENCE["amortisation_gap"], color="C2", ls="--", lw=1, label="Cremer et al. amort. 0.43")
    axes[0].set_xlabel("nats per image")
    axes[0].set_ylabel("test images")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"Gaps on {approx.size} binarized MNIST test images (0.5-99.5 percentiles)")
    steps = np.arange(trace.shape[1])
    axes[1].plot(steps, trace.mean(0), label="mean MC ELBO of q during refinement")
    axes[1].axhline(float(np.mean(gaps.elbo_refined)), color="C2", ls="--", label="ELBO(q*), K samples")
    axes[1].axhline(float(np.mean(gaps.elbo_amortised)), color="C3", ls=":", label="ELBO(q), amortised")
    axes[1].axhline(float(np.mean(gaps.log_px)), color="k", ls="-.", label="log p(x), IS from q")
    axes[1].axhline(float(np.mean(gaps.log_px_refined_q)), color="k", ls="--", label="log p(x), IS from q*")
    axes[1].set_xlabel("refinement step")
    axes[1].set_ylabel("nats per image")
    lo = float(np.mean(gaps.elbo_amortised)) - 1.0
    axes[1].set_ylim(lo, float(max(np.mean(gaps.log_px), np.mean(gaps.log_px_refined_q))) + 0.5)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--num-test", type=int, default=1000, help="test images (a fixed random subset)")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--is-samples", type=int, default=5000, help="K for log p(x) and both ELBOs")
    ap.add_argument("--steps", type=int, default=300, help="refinement steps per image")
    ap.add_argument("--lr", type=float, default=3e-2, help="refinement learning rate (cosine-decayed to 1e-4)")
    ap.add_argument("--refine-samples", type=int, default=10, help="samples of z per refinement step")
    ap.add_argument("--lg-points", type=int, default=200, help="linear-Gaussian points (0: skip that row)")
    ap.add_argument("--lg-steps", type=int, default=1000, help="refinement steps for the linear-Gaussian row")
    ap.add_argument("--lg-only", action="store_true",
                    help="recompute only the linear-Gaussian row, into the existing --out file (no MNIST needed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "diagnostics_gaps.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.lg_only:
        result = json.loads(out.read_text()) if out.is_file() else {}
        result["linear_gaussian"] = lg = linear_gaussian_row(args.lg_points, args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"linear-Gaussian (exact): approximation gap {lg['approximation_gap']:.2e} (max "
              f"{lg['approximation_gap_max']:.2e}), amortisation gap {lg['amortisation_gap']:.2f}; wrote {out}")
        return 0
    model, params, record = load_vae(args.params, args.record, "diagnostics_gaps")
    x, rows = test_subset(args.data_dir, args.num_test, args.subset_seed, "diagnostics_gaps")
    print(f"{x.shape[0]} binarized MNIST test images; VAE trained {record['training']['epochs_run']} epochs "
          f"(test ELBO {record['final_test_elbo']:.2f})", flush=True)
    k_refine, k_eval = jax.random.split(jax.random.key(args.seed))
    t0 = time.perf_counter()
    refinement = inf.refine(model, params, x, k_refine, batch_size=100, progress=args.progress, steps=args.steps,
                            learning_rate=args.lr, num_samples=args.refine_samples, estimator="stl")
    jax.block_until_ready(refinement)
    t_refine = time.perf_counter() - t0
    gaps, _ = inf.decompose_gaps(model, params, x, k_eval, num_samples=args.is_samples, chunk_size=500,
                                 batch_size=20, progress=args.progress, refinement=refinement)
    t_eval = time.perf_counter() - t0 - t_refine
    summary = gaps.summary()
    trace = np.asarray(refinement.trace, np.float64)
    below = np.asarray((gaps.elbo_refined - gaps.elbo_amortised)
                       / jnp.hypot(gaps.elbo_refined_stderr, gaps.elbo_amortised_stderr))
    above = np.asarray((gaps.log_px - gaps.elbo_refined) / jnp.hypot(gaps.log_px_stderr, gaps.elbo_refined_stderr))
    result = {
        "summary": summary, "reference": REFERENCE,
        "checks": {"images_with_refined_below_amortised_by_3se": int(np.sum(below < -3)),
                   "images_with_refined_above_is_by_3se": int(np.sum(above < -3)),
                   "images_with_is_from_qstar_above_is_from_q_by_3se": int(np.sum(
                       np.asarray((gaps.log_px_refined_q - gaps.log_px) / gaps.log_px_stderr) > 3))},
        "settings": {"num_test": int(x.shape[0]), "subset_seed": args.subset_seed, "is_samples": args.is_samples,
                     "refine_steps": args.steps, "refine_lr": args.lr, "refine_lr_final": 1e-4,
                     "refine_samples": args.refine_samples, "refine_estimator": "stl", "optimizer": "adam",
                     "family": "factorised Gaussian (loc, log scale), from the encoder's output"},
        "vae": {"config": record["model_config"], "training": record["training"],
                "final_test_elbo_10000_images": record["final_test_elbo"]},
        "refine_trace_mean": [round(float(v), 4) for v in trace.mean(0)],
        "per_image": {"row": rows.tolist(),
                      **{name: np.round(np.asarray(v, np.float64), 4).tolist() for name, v in gaps._asdict().items()}},
        "seconds": {"refine": round(t_refine, 1), "evaluate": round(t_eval, 1)},
        "machine": machine(),
    }
    if args.lg_points > 0:
        result["linear_gaussian"] = linear_gaussian_row(args.lg_points, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    figure(gaps, trace, out.with_suffix(".png"))
    s = summary
    print(f"{'':28}{'ours':>10}{'Cremer et al.':>15}")
    for name in ("log_px", "log_px_refined_q", "elbo_refined", "elbo_amortised", "approximation_gap",
                 "approximation_gap_qstar_is", "amortisation_gap"):
        ref = REFERENCE.get(name.replace("_qstar_is", "").replace("_refined_q", ""), float("nan"))
        print(f"{name:28}{s[name]:10.2f}{ref:15.2f}")
    print(f"log p(x) from q*: {s['log_px_refined_q']:.2f}; ESS amortised {s['ess_amortised']:.0f}, refined "
          f"{s['ess_refined']:.0f} of {args.is_samples}; checks {result['checks']}")
    if "linear_gaussian" in result:
        lg = result["linear_gaussian"]
        print(f"linear-Gaussian (exact): approximation gap {lg['approximation_gap']:.2e} (max "
              f"{lg['approximation_gap_max']:.2e}), amortisation gap {lg['amortisation_gap']:.2f}")
    print(f"refine {t_refine:.0f} s, evaluate {t_eval:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
