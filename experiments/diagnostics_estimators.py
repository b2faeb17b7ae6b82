"""Gradient estimators of the ELBO: reparameterisation, sticking the landing (STL), score function (leave-one-out
baseline). Their variance at initialisation and after training, on the linear-Gaussian model (exact posterior known)
and on the MNIST VAE; short training runs with each.

    python experiments/diagnostics_estimators.py [--data-dir DIR] [--num-keys 1000] [--num-samples 4]
                                                 [--train-epochs 3]

Variance = the mean over parameters of the per-parameter variance of the minibatch gradient over --num-keys keys
(a fixed minibatch; only the Monte-Carlo draws change), reported for q's parameters (encoder), the decoder's and all.
Every estimator uses the same M = --num-samples draws of z per example (the score function's leave-one-out baseline
needs M >= 2). Estimators: ``reparam`` (analytic KL, the training default), ``reparam_mc`` (Monte-Carlo KL, the form
STL modifies), ``stl``, ``score``.

Linear-Gaussian model (5-d x, 2-d z, full-covariance q): the encoder is moved along the straight line from the crude
default encoder (t = 0) to the exact posterior (t = 1) and the variances recorded against the exact gap
KL(q || p(z | x)); then the model is trained from the default initialisation with each estimator (Adam 1e-2) and the
variances measured again at the trained parameters. MNIST: the VAE of diagnostics_vae.py after training, and the same
architecture at initialisation, on --var-batch test images; then --train-epochs epochs of training from initialisation
with each estimator (dynamically binarized training images, Adam 1e-3, batch 100), test ELBO on 2,000 test images.

Writes --out (default experiments/results/diagnostics_estimators.json) and <stem>.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from diagnostics_vae import RESULTS, add_common_arguments, load_vae, machine, test_subset, train_images
from dlvm_jax import inference as inf
from dlvm_jax.models import LinearGaussian, LinearGaussianConfig
from dlvm_jax.objectives import make_loss
from dlvm_jax.train import fit, init_state

ESTIMATORS = {"reparam": dict(estimator="reparam"), "reparam_mc": dict(estimator="reparam", analytic_kl=False),
              "stl": dict(estimator="stl"), "score": dict(estimator="score")}
PATH_T = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def variances(stats: inf.GradientStatistics, groups: tuple[str, str]) -> dict[str, float]:
    enc, dec = groups
    return {"encoder": stats.mean_variance(enc), "decoder": stats.mean_variance(dec), "all": stats.mean_variance(),
            "encoder_mean_sq_gradient": stats.mean_square_gradient(enc)}


def linear_gaussian_part(args: argparse.Namespace) -> dict:
    model = LinearGaussian(LinearGaussianConfig(data_dim=5, latent_dim=2))
    params = jax.jit(model.init)(jax.random.key(0))
    data = jax.jit(model.sample_data, static_argnums=2)(params, jax.random.key(1), 1500)
    x_train, x_test = data[:1000], data[1000:]
    batch = x_train[: args.lg_batch]
    exact_enc = jax.jit(model.exact_encoder)(params["generative"])
    stats_fns = {name: inf.make_gradient_statistics(make_loss(model, num_samples=args.num_samples, **kw),
                                                    num_keys=args.num_keys, chunk=100)
                 for name, kw in ESTIMATORS.items()}

    @jax.jit
    def mean_gap(params, x):  # exact KL(q || p(z|x)) = log p(x) - ELBO, averaged over x
        return jnp.mean(jax.vmap(lambda xi: model.exact_log_prob(params, xi)
                                 - inf.linear_gaussian_elbo(model, params, xi))(x))

    path = []
    for t in tqdm(PATH_T, desc="linear-Gaussian path", disable=not args.progress, leave=False):
        enc = jax.tree.map(lambda a, b: (1 - t) * a + t * b, params["encoder"], exact_enc)
        p = {"generative": params["generative"], "encoder": enc}
        row = {"t": t, "gap": float(mean_gap(p, batch))}
        for name, fn in stats_fns.items():
            row[name] = variances(fn(p, batch, jax.random.key(3)), ("encoder", "generative"))
        path.append(row)

    training = {}
    for name, kw in tqdm(ESTIMATORS.items(), desc="linear-Gaussian training", disable=not args.progress,
                         leave=False):
        opt = optax.adam(1e-2)
        start = jax.tree.map(jnp.copy, params)  # fit donates its state
        state, hist = fit(init_state(start, opt, jax.random.key(4)), x_train,
                          loss_fn=make_loss(model, num_samples=args.num_samples, **kw), optimizer=opt,
                          batch_size=100, epochs=args.lg_epochs, progress=False)
        trained = state.params
        exact_elbo = jax.jit(lambda p, x: jnp.mean(jax.vmap(lambda xi: inf.linear_gaussian_elbo(model, p, xi))(x)))
        log_px = jax.jit(lambda p, x: jnp.mean(jax.vmap(lambda xi: model.exact_log_prob(p, xi))(x)))
        training[name] = {
            "test_elbo_exact": float(exact_elbo(trained, x_test)), "test_log_px_exact": float(log_px(trained, x_test)),
            "test_gap_exact": float(mean_gap(trained, x_test)),
            "variance_init": variances(stats_fns[name](params, batch, jax.random.key(5)), ("encoder", "generative")),
            "variance_trained": variances(stats_fns[name](trained, batch, jax.random.key(5)),
                                          ("encoder", "generative")),
        }
    return {"model": "linear-Gaussian, 5-d x, 2-d z, full-covariance amortised q", "batch": args.lg_batch,
            "num_samples": args.num_samples, "num_keys": args.num_keys, "path": path,
            "training": {"epochs": args.lg_epochs, "steps": args.lg_epochs * 10, "optimizer": "adam 1e-2",
                         "batch_size": 100, "train_points": 1000, "test_points": 500, "by_estimator": training}}


def mnist_part(args: argparse.Namespace) -> dict:
    model, trained, record = load_vae(args.params, args.record, "diagnostics_estimators")
    x, rows = test_subset(args.data_dir, args.var_batch, args.subset_seed, "diagnostics_estimators")
    grey = train_images(args.data_dir, "diagnostics_estimators")
    init = jax.jit(lambda k, m: model.init(k, data_mean=m))(jax.random.key(0), grey.mean(0))
    batch = jnp.asarray(x)
    out = {"batch": int(x.shape[0]), "num_samples": args.num_samples, "num_keys": args.num_keys,
           "trained_vae": {"epochs": record["training"]["epochs_run"], "test_elbo": record["final_test_elbo"]},
           "variance": {}}
    for name, kw in tqdm(ESTIMATORS.items(), desc="MNIST variance", disable=not args.progress, leave=False):
        fn = inf.make_gradient_statistics(make_loss(model, num_samples=args.num_samples, **kw),
                                          num_keys=args.num_keys, chunk=50)
        t = time.perf_counter()
        out["variance"][name] = {"init": variances(fn(init, batch, jax.random.key(1)), ("encoder", "decoder")),
                                 "trained": variances(fn(trained, batch, jax.random.key(1)), ("encoder", "decoder")),
                                 "seconds": round(time.perf_counter() - t, 1)}
    if args.train_epochs > 0:
        x_test, _ = test_subset(args.data_dir, 2000, args.subset_seed + 1, "diagnostics_estimators")
        curves = {}
        for name, kw in tqdm(ESTIMATORS.items(), desc="MNIST training", disable=not args.progress, leave=False):
            opt = optax.adam(1e-3)
            start = jax.tree.map(jnp.copy, init)
            t = time.perf_counter()
            base = make_loss(model, num_samples=args.num_samples, **kw)

            def loss_fn(params, b, key, step, base=base):
                k_bin, k_loss = jax.random.split(key)
                return base(params, jax.random.bernoulli(k_bin, b).astype(b.dtype), k_loss, step)

            state, hist = fit(init_state(start, opt, jax.random.key(2)), grey, loss_fn=loss_fn,
                              eval_loss_fn=make_loss(model), optimizer=opt, batch_size=100, epochs=args.train_epochs,
                              test_data=x_test, eval_every=1, progress=False, eval_key=jax.random.key(3))
            curves[name] = {"test_elbo_by_epoch": [h["test_elbo"] for h in hist],
                            "seconds": round(time.perf_counter() - t, 1)}
        out["training"] = {"epochs": args.train_epochs, "optimizer": "adam 1e-3", "batch_size": 100,
                           "train": "60,000 MNIST training images, dynamically binarized",
                           "test": "2,000 binarized test images (analytic-KL ELBO, 1 sample)", "by_estimator": curves}
    return out


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "mnist" in result and "training" in result["mnist"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4))
    lg = result["linear_gaussian"]["path"]
    for name in ESTIMATORS:
        gap = np.array([r["gap"] for r in lg])
        var = np.array([r[name]["encoder"] for r in lg])
        keep = gap > 0
        axes[0].loglog(gap[keep], np.maximum(var[keep], 1e-12), "o-", label=name)
    axes[0].set_xlabel("KL(q || p(z|x)) (nats, exact)")
    axes[0].set_ylabel("mean per-parameter variance, encoder")
    axes[0].set_title("Linear-Gaussian: q -> exact posterior")
    axes[0].legend(fontsize=8)
    if "mnist" in result:
        mn = result["mnist"]["variance"]
        names = list(mn)
        pos = np.arange(len(names))
        axes[1].bar(pos - 0.2, [mn[n]["init"]["encoder"] for n in names], 0.4, label="initialisation")
        axes[1].bar(pos + 0.2, [mn[n]["trained"]["encoder"] for n in names], 0.4, label="trained VAE")
        axes[1].set_yscale("log")
        axes[1].set_xticks(pos, names)
        axes[1].set_ylabel("mean per-parameter variance, encoder")
        axes[1].set_title(f"MNIST VAE ({result['mnist']['batch']} images, M={result['mnist']['num_samples']})")
        axes[1].legend(fontsize=8)
        if panels == 3:
            for name, c in result["mnist"]["training"]["by_estimator"].items():
                axes[2].plot(np.arange(len(c["test_elbo_by_epoch"])), c["test_elbo_by_epoch"], "o-", label=name)
            axes[2].set_xlabel("epoch")
            axes[2].set_ylabel("test ELBO (nats)")
            lo = min(min(c["test_elbo_by_epoch"][1:] or [0]) for c in result["mnist"]["training"]["by_estimator"]
                     .values())
            axes[2].set_ylim(lo - 5, None)
            axes[2].set_title("MNIST training with each estimator")
            axes[2].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(ap)
    ap.add_argument("--num-keys", type=int, default=1000, help="Monte-Carlo keys per variance")
    ap.add_argument("--num-samples", type=int, default=4, help="M, samples of z per example (>= 2)")
    ap.add_argument("--lg-batch", type=int, default=32, help="linear-Gaussian minibatch for the variances")
    ap.add_argument("--lg-epochs", type=int, default=100, help="linear-Gaussian training epochs (10 steps each)")
    ap.add_argument("--var-batch", type=int, default=20, help="MNIST test images in the minibatch")
    ap.add_argument("--train-epochs", type=int, default=3, help="MNIST training epochs per estimator (0: skip)")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--skip-mnist", action="store_true", help="only the linear-Gaussian part (no data needed)")
    ap.add_argument("--out", default=str(RESULTS / "diagnostics_estimators.json"))
    args = ap.parse_args(argv)
    if args.num_samples < 2:
        raise SystemExit("diagnostics_estimators: --num-samples must be >= 2 (the score function's baseline)")
    t0 = time.perf_counter()
    result = {"estimators": {"reparam": "pathwise, analytic KL", "reparam_mc": "pathwise, Monte-Carlo KL",
                             "stl": "sticking the landing (Roeder et al. 2017)",
                             "score": "score function, leave-one-out baseline over the M samples"},
              "linear_gaussian": linear_gaussian_part(args)}
    if not args.skip_mnist:
        result["mnist"] = mnist_part(args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["machine"] = machine()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    figure(result, out.with_suffix(".png"))
    print("linear-Gaussian path: encoder-gradient variance against the exact gap")
    print(f"{'t':>6}{'gap':>10}" + "".join(f"{n:>13}" for n in ESTIMATORS))
    for r in result["linear_gaussian"]["path"]:
        print(f"{r['t']:6.3f}{r['gap']:10.4f}" + "".join(f"{r[n]['encoder']:13.4g}" for n in ESTIMATORS))
    print("linear-Gaussian training: exact test gap, encoder variance init -> trained")
    for n, r in result["linear_gaussian"]["training"]["by_estimator"].items():
        print(f"{n:>12}: gap {r['test_gap_exact']:.4f}, variance {r['variance_init']['encoder']:.4g} -> "
              f"{r['variance_trained']['encoder']:.4g}")
    if "mnist" in result:
        print("MNIST: encoder / decoder variance at init and trained")
        for n, r in result["mnist"]["variance"].items():
            print(f"{n:>12}: init {r['init']['encoder']:.4g} / {r['init']['decoder']:.4g}, trained "
                  f"{r['trained']['encoder']:.4g} / {r['trained']['decoder']:.4g}")
        for n, c in result["mnist"].get("training", {}).get("by_estimator", {}).items():
            print(f"{n:>12}: test ELBO by epoch {[round(v, 2) for v in c['test_elbo_by_epoch']]}")
    print(f"{result['seconds']:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
