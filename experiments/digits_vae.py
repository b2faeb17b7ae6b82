"""VAEs on scikit-learn's 8x8 digits (no download): likelihoods and objectives side by side.

    python experiments/digits_vae.py [--epochs 200] [--num-samples 5000]

For each setting: the MLP VAE of `dlvm train vae` (16 latents, 200-200 relu), Adam 1e-3, batch 100; test ELBO
at initialisation and at the end, and the importance-sampled test log p(x) (K = --num-samples) with its standard
errors and effective sample size. Writes experiments/results/digits_vae.json.
Values are nats per test example; continuous-data likelihoods give log-densities (comparable only within a
likelihood).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import optax

from dlvm_jax import VAE, VAEConfig, data, fit, init_state, log_likelihood, make_loss

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = [
    {"likelihood": "continuous_bernoulli", "objective": "elbo", "num_samples": 1},
    {"likelihood": "continuous_bernoulli", "objective": "iwae", "num_samples": 5},
    {"likelihood": "gaussian", "objective": "elbo", "num_samples": 1},
    {"likelihood": "bernoulli", "objective": "elbo", "num_samples": 1},
    {"likelihood": "bernoulli", "objective": "iwae", "num_samples": 5},
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=5000, help="K of the IS log-likelihood")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "digits_vae.json"))
    args = ap.parse_args(argv)
    ds = data.digits()
    rows = []
    for s in SETTINGS:
        model = VAE(VAEConfig(data_shape=ds.data_shape, latent_dim=16, hidden=(200, 200), activation="relu",
                              likelihood=s["likelihood"]))
        opt = optax.adam(1e-3)
        k_init, k_train, k_eval = jax.random.split(jax.random.key(args.seed), 3)
        mean = ds.x_train.mean(0) if s["likelihood"] == "bernoulli" else None
        state = init_state(model.init(k_init, mean), opt, k_train)
        t = time.perf_counter()
        state, hist = fit(state, ds.x_train, loss_fn=make_loss(model, objective=s["objective"],
                                                               num_samples=s["num_samples"]),
                          eval_loss_fn=make_loss(model), optimizer=opt, batch_size=100, epochs=args.epochs,
                          test_data=ds.x_test, eval_every=args.epochs, progress=False)
        seconds = time.perf_counter() - t
        est = log_likelihood(model, state.params, ds.x_test, k_eval, num_samples=args.num_samples, progress=False)
        row = {**s, "epochs": args.epochs, "train_seconds": round(seconds, 2),
               "initial_test_elbo": hist[0]["test_elbo"], "final_test_elbo": hist[-1]["test_elbo"],
               "test_kl": hist[-1]["test_kl"], "is_num_samples": args.num_samples, **est.summary()}
        rows.append(row)
        print(f"{s['likelihood']:>20} {s['objective']} K={s['num_samples']}: test ELBO {row['initial_test_elbo']:8.2f}"
              f" -> {row['final_test_elbo']:8.2f}; log p(x) {row['log_px']:8.2f} +- {row['log_px_se_over_data']:.2f}"
              f" (MC s.e. {row['log_px_mc_se']:.3f}, ESS {row['ess_mean']:.0f}); {seconds:.1f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%d"),
                                          "jax": jax.__version__, "backend": jax.default_backend()}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
