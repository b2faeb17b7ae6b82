"""GMVAE clustering of MNIST (MLP networks), scored by Hungarian accuracy, the paper's many-to-one accuracy and NMI.

    python experiments/mnist_gmvae.py --data-dir DIR [--recipe pretrained|paper] [--clusters 10,16] [--seeds 3]
        [--epochs E] [--parallel-seeds] [--time-limit S] [--checkpoint-dir DIR [--resume]] [--baselines]
        [--no-gmvae] [--out FILE]

Both recipes use the paper's networks (Dilokthanakul et al. 2016, the defaults of its code Nat-D/GMVAE, main.lua
and models/FullyConnected.lua): encoder 784-500-500 with batch normalisation and ReLU, decoder 500-500 ReLU, prior
network w-500 (tanh)-K x 2 x dim(l), log-variance outputs; batch 50, Adam 1e-4, free bits 0.5; Bernoulli
likelihood on the [0, 1] grey levels.

- ``--recipe pretrained`` (the default): l (the paper's x) and w 10-D; an autoencoder pretrained for 60 epochs,
  p(l | w, z) initialised at a diagonal Gaussian mixture fitted to its latent means (VaDE-style,
  :func:`dlvm_jax.models.gmvae.pretrained_init`), then 30 epochs of the GMVAE with the ELBO's own gradient.
- ``--recipe paper``: the paper code's setting: random initialisation, l 200-D, w 150-D, 100 epochs, and the code's
  gradient (``--cluster-gradient paper``, see :func:`dlvm_jax.models.gmvae.make_gmvae_loss`; with ``elbo``, the
  ELBO's own gradient, every digit ends in one cluster). Its results: mnist_gmvae_paper.json (``--out``).

Any option given overrides its recipe's value. Clusters are predicted at the posterior means, the encoder
normalised with the training set's statistics, and scored on the 10,000 test images (the model never sees their
labels). Baselines: k-means and a Gaussian mixture (diagonal) on raw pixels.

Writes experiments/results/mnist_gmvae.json (per K and seed: accuracy_hungarian, accuracy_many_to_one, nmi) after
every run, and a figure of 10 generated digits per cluster, one row per cluster, labelled with the cluster's most
frequent test digit (mnist_gmvae_K<k>_seed<s>_samples.png). ``--parallel-seeds`` trains the seeds of random initialisations
together as vmapped restarts (3 seeds of the paper setting: ~110 s an epoch on 2 CPU cores, ~3 hours for 100
epochs); a pretrained initialisation trains its seeds one by one.
``--time-limit`` stops a fit early and scores it. With ``--checkpoint-dir`` each fit checkpoints at every
evaluation (orbax), and ``--resume`` keeps the runs already in the JSON and continues an interrupted one from its
latest checkpoint.
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
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from dlvm_jax import data, metrics, plots
from dlvm_jax.models.gmvae import (CLUSTER_GRADIENTS, SCALES, GMVAE, GMVAEConfig, make_gmvae_loss,
                                   pretrained_init)
from dlvm_jax.train import fit_restarts

RESULTS = Path(__file__).resolve().parent / "results"

#: The paper's table (mean +- std over runs, best), many-to-one accuracy in % (REFERENCES.md, [reported]).
PAPER = {10: {"M=1": "77.78 +- 5.75 (87.31)", "M=10": "82.31 +- 3.75 (88.54)"},
         16: {"M=1": "85.09 +- 1.99 (89.01)", "M=10": "87.82 +- 5.33 (96.92)"}}


#: Two settings (``--recipe``); any option given on the command line overrides its recipe's value.
#: "paper": the paper's code (random initialisation, l 200-D, w 150-D, its sign-flipped cluster gradient, 100
#: epochs). "pretrained": the same networks with l and w 10-D, initialised VaDE-style (an autoencoder pretrained
#: for ``pretrain_epochs``, then p(l | w, z) set to a diagonal Gaussian mixture fitted to its latent means, see
#: :func:`dlvm_jax.models.gmvae.pretrained_init`) and trained with the ELBO's own gradient.
RECIPES = {
    "paper": {"init": "random", "local_dim": 200, "global_dim": 150, "cluster_gradient": "paper", "epochs": 100,
              "pretrain_epochs": 0},
    "pretrained": {"init": "pretrain", "local_dim": 10, "global_dim": 10, "cluster_gradient": "elbo", "epochs": 30,
                   "pretrain_epochs": 60},
}


def scores(y: np.ndarray, pred: np.ndarray) -> dict:
    return {"accuracy_hungarian": metrics.hungarian_accuracy(y, pred),
            "accuracy_many_to_one": metrics.many_to_one_accuracy(y, pred), "nmi": metrics.nmi(y, pred)}


def widths(text: str) -> tuple[int, ...]:
    return tuple(int(w) for w in text.split(",") if w.strip())


def eval_loss(model: GMVAE):
    """Minus the ELBO on a test batch (no free bits), plus ``clusters_used``: how many clusters the batch's argmax
    assignments fill (a label-free sign of collapse; a batch-normalised encoder uses the batch's statistics)."""
    base = make_gmvae_loss(model, free_bits=0.0)

    def loss_fn(params, batch, key, step):
        loss, m = base(params, batch, key, step)
        pred = model.predict(model.with_stats(params, batch), batch)
        used = jnp.sum(jnp.bincount(pred, length=model.config.clusters) > 0).astype(jnp.float32)
        return loss, {**m, "clusters_used": used}

    return loss_fn


def make_finisher(model: GMVAE):
    """``finish(params, seed=..., x_train=..., x_test=..., y_test=..., out=...)``: score one trained GMVAE on the
    test set and draw its samples-per-cluster figure (jitted once per model, shared by its seeds);
    ``finish.predict(params, x_train, x_test)`` gives the clusters alone."""
    k = model.config.clusters
    with_stats, predict = jax.jit(model.with_stats), jax.jit(model.predict)
    sample_clusters = jax.jit(model.sample_clusters, static_argnums=2)

    def assign(params, x_train, x_test) -> np.ndarray:
        """Clusters of ``x_test`` (a batch-normalised encoder is normalised with the training set's statistics)."""
        return np.asarray(predict(with_stats(params, x_train), x_test))

    def finish(params, *, seed: int, x_train, x_test, y_test, out: Path) -> dict:
        pred = assign(params, x_train, x_test)
        samples = np.asarray(sample_clusters(params, jax.random.key(1000 + seed), 10))  # (K, 10, 784)
        labels = [f"{c}: {np.bincount(y_test[pred == c], minlength=10).argmax()}" if np.any(pred == c)
                  else f"{c}: -" for c in range(k)]  # cluster: its most frequent test digit
        figure = out.with_name(f"{out.stem}_K{k}_seed{seed}_samples.png")
        plots.image_grid(samples.reshape(-1, 784), figure, ncols=10, row_labels=labels,
                         title=f"GMVAE K={k}, seed {seed}: 10 samples per cluster (row: cluster: majority digit)")
        rec = {"seed": seed, **scores(y_test, pred), "clusters_used": int(np.unique(pred).size)}
        print(f"K={k} seed {seed}: many-to-one {rec['accuracy_many_to_one']:.4f}, Hungarian "
              f"{rec['accuracy_hungarian']:.4f}, NMI {rec['nmi']:.4f}, {rec['clusters_used']} clusters used",
              flush=True)
        return rec

    finish.predict = assign
    return finish


def run_setting(config: dict) -> dict:
    """What a GMVAE run depends on: the config without the list of K and the number of seeds."""
    return {k: v for k, v in config.items() if k not in ("clusters", "seeds")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--clusters", default="10,16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recipe", default="pretrained", choices=tuple(RECIPES),
                    help="'pretrained' (default): VaDE-style initialisation, l and w 10-D, the ELBO's gradient; "
                         "'paper': the paper code's setting; the options below override the recipe's values")
    ap.add_argument("--init", default=None, choices=("random", "pretrain"),
                    help="random, or pretrain: autoencoder pretraining + a Gaussian mixture on its latents")
    ap.add_argument("--pretrain-epochs", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hidden", default="500,500", help="encoder widths (the decoder mirrors them), comma-separated")
    ap.add_argument("--prior-hidden", default="500", help="the prior network's widths, comma-separated")
    ap.add_argument("--prior-activation", default="tanh")
    ap.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                    help="no batch normalisation in the encoder")
    ap.add_argument("--cluster-gradient", default=None, choices=CLUSTER_GRADIENTS,
                    help="'paper': the published code's gradient; 'elbo': the ELBO's own")
    ap.add_argument("--local-dim", type=int, default=None)
    ap.add_argument("--global-dim", type=int, default=None)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--free-bits", type=float, default=0.5)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="stop each fit at the end of the first epoch past this many seconds (then score it)")
    ap.add_argument("--scale", default="log_var", choices=SCALES,
                    help="standard deviations as exp(raw / 2) (the paper's log-variances) or softplus(raw)")
    ap.add_argument("--parallel-seeds", action="store_true",
                    help="train the missing seeds together, as the vmapped restarts of one fit (seed s is then "
                         "restart s of the first missing seed's key), each scored on its own")
    ap.add_argument("--baselines", action="store_true", help="also k-means and a Gaussian mixture on raw pixels")
    ap.add_argument("--no-gmvae", dest="gmvae", action="store_false", help="skip the GMVAE runs (baselines only)")
    ap.add_argument("--checkpoint-dir", default=None, help="checkpoint each run here (DIR/K<k>_seed<s>)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in --out and resume unfinished ones from --checkpoint-dir")
    ap.add_argument("--max-train", type=int, default=None, help="keep the first N training images (smoke tests)")
    ap.add_argument("--max-test", type=int, default=None, help="keep the first N test images (smoke tests)")
    ap.add_argument("--out", default=str(RESULTS / "mnist_gmvae.json"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.init == "pretrain" and args.pretrain_epochs < 1:
        ap.error("--init pretrain needs --pretrain-epochs >= 1")
    if args.init == "pretrain" and args.parallel_seeds:
        ap.error("--parallel-seeds trains random initialisations together; with --init pretrain seeds run one by one")
    ds = data.mnist(args.data_dir)
    x_train, x_test, y_test = ds.x_train[: args.max_train], ds.x_test[: args.max_test], ds.y_test[: args.max_test]
    config = {k: v for k, v in vars(args).items()
              if k not in ("data_dir", "out", "progress", "checkpoint_dir", "resume", "gmvae", "baselines",
                           "parallel_seeds", "time_limit")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": config, "paper_many_to_one_percent": PAPER, "date": time.strftime("%Y-%m-%d"),
                     "runs": {}}
    if out.exists() and (args.resume or not args.gmvae):  # keep what is there (--no-gmvae adds baselines only)
        previous = json.loads(out.read_text())
        if args.gmvae and run_setting(previous.get("config", {})) != run_setting(config):
            raise SystemExit(f"--resume: {out} was written with a different setting ({previous.get('config')}); "
                             "use another --out or the same options")
        results = {**previous, "date": time.strftime("%Y-%m-%d")}
        if args.gmvae:
            results["config"] = config
    elif out.exists():  # a fresh GMVAE setting: the raw-pixel baselines do not depend on it
        results["baselines"] = json.loads(out.read_text()).get("baselines", {})
        if not results["baselines"]:
            del results["baselines"]
    for k in (int(c) for c in args.clusters.split(",")):
        model = GMVAE(GMVAEConfig(data_shape=(784,), clusters=k, local_dim=args.local_dim, global_dim=args.global_dim,
                                  hidden=widths(args.hidden), prior_hidden=widths(args.prior_hidden),
                                  activation="relu", prior_activation=args.prior_activation,
                                  batch_norm=args.batch_norm, scale=args.scale, likelihood="bernoulli"))
        loss_fn = make_gmvae_loss(model, num_samples=args.num_samples, free_bits=args.free_bits,
                                  cluster_gradient=args.cluster_gradient)
        runs = [r for r in results["runs"].get(str(k), []) if r["seed"] < args.seeds]
        missing = [seed for seed in range(args.seeds) if args.gmvae and not any(r["seed"] == seed for r in runs)]
        for seed in sorted(set(range(args.seeds)) - set(missing)) if args.gmvae else ():
            print(f"K={k} seed {seed}: already in {out}, kept", flush=True)
        # One fit per seed, or (--parallel-seeds) every missing seed at once as the restarts of one vmapped fit.
        groups = [missing] if args.parallel_seeds and missing else [[seed] for seed in missing]
        finish = None  # jitted scoring, made once per K when a fit needs it
        for group in groups:
            t = time.perf_counter()
            name = f"K{k}_seed{group[0]}" if len(group) == 1 else f"K{k}_seeds{group[0]}-{group[-1]}"
            ckpt = None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / name
            init_fn, pre = model.init, {}
            if args.init == "pretrain":
                tp = time.perf_counter()
                params0, info = pretrained_init(model, x_train, jax.random.fold_in(jax.random.key(group[0]), 99),
                                                epochs=args.pretrain_epochs, progress=args.progress)
                finish = finish or make_finisher(model)
                pre = {"pretrain_loss": info["pretrain_loss"],
                       "pretrain_seconds": round(time.perf_counter() - tp, 1),
                       "at_init": scores(y_test, finish.predict(params0, x_train, x_test))}
                print(f"K={k} seed {group[0]}: after pretraining, many-to-one "
                      f"{pre['at_init']['accuracy_many_to_one']:.4f}", flush=True)
                init_fn = lambda key, p=params0: p  # noqa: E731  (the restarts' key is not used)
            state, history, sel = fit_restarts(
                model, x_train, init_fn=init_fn, loss_fn=loss_fn, optimizer=optax.adam(args.lr),
                key=jax.random.key(group[0]), restarts=args.restarts if len(group) == 1 else len(group),
                batch_size=args.batch_size, epochs=args.epochs, eval_every=max(1, args.epochs // 10),
                test_data=x_test[:2000], eval_loss_fn=eval_loss(model), progress=args.progress,
                keep_all=len(group) > 1, checkpoint_dir=ckpt, time_limit=args.time_limit,
                resume=args.resume and ckpt is not None and ckpt.exists())
            seconds = round(time.perf_counter() - t, 1)
            finish = finish or make_finisher(model)
            each = ([state.params] if len(group) == 1 else
                    [jax.tree.map(lambda a, i=i: a[i], sel["all_params"]) for i in range(len(group))])
            for seed, params in zip(group, each):
                rec = finish(params, seed=seed, x_train=x_train, x_test=x_test, y_test=y_test, out=out)
                rec.update(seconds=seconds, epochs=history[-1]["epoch"], trained_with_seeds=group, **pre)
                if len(group) == 1:
                    rec["final"] = {kk: v for kk, v in history[-1].items() if kk.startswith(("train_", "test_"))}
                runs = sorted(runs + [rec], key=lambda r: r["seed"])
                results["runs"][str(k)] = runs
                out.write_text(json.dumps(results, indent=1))
        if args.baselines:
            base = {}
            for name, make in (("kmeans", lambda s: KMeans(k, random_state=s, n_init=1)),
                               ("gaussian_mixture", lambda s: GaussianMixture(k, covariance_type="diag",
                                                                              random_state=s))):
                base[name] = [scores(y_test, make(s).fit(x_train).predict(x_test)) for s in range(args.seeds)]
                print(f"K={k} {name}: many-to-one {np.mean([b['accuracy_many_to_one'] for b in base[name]]):.4f}",
                      flush=True)
            results.setdefault("baselines", {})[str(k)] = base
            out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
