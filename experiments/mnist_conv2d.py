"""The seeds' convolutional VAE on thresholded MNIST: a 2-dimensional latent space, test ELBO per epoch, IS log p(x).

    python experiments/mnist_conv2d.py [--data-dir DIR] [--epochs 20] [--is-examples 1000] [--is-samples 5000]

Data: MNIST (``DIR/mnist``, the four IDX files; ``--data-dir`` or ``$DLVM_DATA_DIR``), pixels / 255 thresholded
at 0.5 (pixel > 127.5), images (28, 28, 1). Model: VAEConfig(data_shape=(28, 28, 1), latent_dim=2,
network="conv", likelihood="bernoulli"): the conv encoder / decoder of dlvm_jax.networks. Training: the ELBO
with the analytic KL and one sample, RMSProp lr 1e-3 with Keras' defaults (see ``keras_rmsprop``), batch 100,
``--epochs`` passes over the 60,000 training images (``--max-train`` keeps the first N, for smoke tests).

Recorded: the test negative ELBO (analytic KL, one sample of z per image, the same evaluation key every epoch)
at initialisation and after every epoch, against the seeds' numbers (166.56 after epoch 1, 143.31 after epoch
20, best 142.25 at epoch 17); then the importance-sampled negative log-likelihood (K = ``--is-samples``) of the
first ``--is-examples`` test images (K = 5000 on all 10,000 takes hours on 2 CPU cores; the script prints the
estimate). Writes ``--out`` (default experiments/results/mnist_conv2d.json) and, next to it, the figures
<stem>_latent.png (test-set means of q(z|x) by digit), <stem>_manifold.png (20x20 decoded Bernoulli means over
the prior's quantile grid Phi^-1(linspace(0.05, 0.95, 20)) in each latent dimension, a 560x560 canvas) and
<stem>_curve.png (test negative ELBO per epoch with the reference points).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import norm
from tqdm.auto import tqdm

from dlvm_jax import data, plots
from dlvm_jax.likelihood import ISEstimate, make_batch_estimator
from dlvm_jax.models.vae import VAE, VAEConfig
from dlvm_jax.objectives import make_loss
from dlvm_jax.train import fit, init_state, save_params

RESULTS = Path(__file__).resolve().parent / "results"

#: The seeds' convolutional VAE (shared/REFERENCES.md): test negative ELBO in nats per test image.
REFERENCE = {"test_neg_elbo_epoch1": 166.56, "test_neg_elbo_epoch20": 143.31, "best_test_neg_elbo": 142.25,
             "best_epoch": 17, "source": "the seeds' convolutional VAE (Keras; 2-D latent, MNIST thresholded at "
                                         "127.5, batch 100, RMSProp lr 1e-3)"}
REFERENCE_POINTS = {1: REFERENCE["test_neg_elbo_epoch1"], 17: REFERENCE["best_test_neg_elbo"],
                    20: REFERENCE["test_neg_elbo_epoch20"]}
BATCH_SIZE = 100
MNIST_TEST_SIZE = 10_000


def keras_rmsprop(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """RMSProp as Keras' ``RMSprop`` defaults: rho = 0.9, epsilon = 1e-7, no momentum, not centred.

    Keras 3 (and TensorFlow's ApplyRMSProp kernel) update ``v <- rho v + (1 - rho) g^2``, ``w <- w - lr g /
    sqrt(v + eps)`` from ``v = 0``; optax.rmsprop with ``decay=0.9, eps=1e-7`` (``eps_in_sqrt=True``,
    ``initial_scale=0``, its defaults) is the same update. optax's own default eps is 1e-8; old standalone Keras 2
    put eps outside the root (``sqrt(v) + eps``): with eps this small the three differ only while v ~ eps.
    """
    return optax.rmsprop(learning_rate, decay=0.9, eps=1e-7, initial_scale=0.0, eps_in_sqrt=True)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "optax": optax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def load(args: argparse.Namespace) -> data.Dataset:
    """MNIST as (N, 28, 28, 1) images thresholded at 127.5; SystemExit with one line if the files are missing."""
    try:
        ds = data.mnist(args.data_dir, flat=False)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"mnist_conv2d: {err}") from None
    x_train, y_train = ds.x_train, ds.y_train
    if args.max_train is not None:
        if args.max_train < BATCH_SIZE:
            raise SystemExit(f"mnist_conv2d: --max-train must be at least the batch size {BATCH_SIZE}, "
                             f"got {args.max_train}")
        x_train, y_train = x_train[: args.max_train], y_train[: args.max_train]
    x_test, y_test = ds.x_test, ds.y_test
    if args.max_test is not None:
        x_test, y_test = x_test[: args.max_test], y_test[: args.max_test]
    return data.Dataset(data.threshold(x_train, 0.5), data.threshold(x_test, 0.5), y_train, y_test, name="mnist")


def timed_log_likelihood(model: VAE, params, x: np.ndarray, key: jax.Array, *, num_samples: int, chunk_size: int,
                         batch_size: int, progress: bool = True) -> tuple[ISEstimate, float, float]:
    """:func:`dlvm_jax.likelihood.log_likelihood` (the same batches, keys ``fold_in(key, i)`` and padding, hence the
    same numbers) that also returns the seconds of the first batch (compilation included) and of the rest."""
    n = x.shape[0]
    batch_size = min(batch_size, n)
    estimate = make_batch_estimator(model, num_samples=num_samples, chunk_size=min(chunk_size, num_samples))
    parts, times = [], []
    for i in tqdm(range(-(-n // batch_size)), desc=f"log p(x), K={num_samples}", disable=not progress, leave=False):
        t = time.perf_counter()
        batch = x[i * batch_size:(i + 1) * batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        out = jax.block_until_ready(estimate(params, jnp.asarray(batch), jax.random.fold_in(key, i)))
        parts.append(jax.tree.map(lambda a, r=real: a[:r], out))
        times.append(time.perf_counter() - t)
    return ISEstimate(*(jnp.concatenate(field) for field in zip(*parts))), times[0], float(sum(times[1:]))


def latent_means(model: VAE, params, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Means of q(z | x) for every row of ``x``, ``batch`` images per jitted call."""
    encode = jax.jit(lambda p, xb: model.encode(p, xb).mean())
    return np.concatenate([np.asarray(encode(params, jnp.asarray(x[i:i + batch]))) for i in range(0, len(x), batch)])


def manifold(model: VAE, params, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """The (28n, 28n) canvas of Bernoulli means decoded on the quantile grid, and the grid values.

    Column j is decoded at z[0] = grid[j] and row i at z[1] = grid[n - 1 - i] (up is larger z[1])."""
    grid = norm.ppf(np.linspace(0.05, 0.95, n)).astype(np.float32)
    z0, z1 = np.meshgrid(grid, grid[::-1])  # (row i, column j) -> (grid[j], grid[n - 1 - i])
    z = np.stack([z0.ravel(), z1.ravel()], axis=1)
    means = jax.jit(lambda p, zz: model.decode(p, zz).distribution.mean())(params, jnp.asarray(z))
    return plots.tile_images(np.asarray(means), n, n), grid


def compare(values: list[float]) -> list[str]:
    """Lines comparing our test negative ELBO with the reference."""
    lines = ["epoch   ours      reference"] if values else []
    for e, v in enumerate(values, start=1):
        ref = REFERENCE_POINTS.get(e)
        lines.append(f"{e:5d}  {v:8.2f}" + (f"  {ref:8.2f}  ({v - ref:+.2f})" if ref is not None else ""))
    epochs = len(values)
    ref20 = REFERENCE["test_neg_elbo_epoch20"]
    if epochs >= 20:
        v = values[19]
        verdict = "LOWER (better) than" if v < ref20 else "NOT lower than"
        lines.append(f"epoch 20: ours {v:.2f} is {verdict} the reference {ref20:.2f} ({v - ref20:+.2f} nats)")
        best = int(np.argmin(values[:20])) + 1
        lines.append(f"best of epochs 1..20: ours {values[best - 1]:.2f} at epoch {best}; reference "
                     f"{REFERENCE['best_test_neg_elbo']:.2f} at epoch {REFERENCE['best_epoch']}")
    elif epochs:
        lines.append(f"only {epochs} epoch(s) run: the epoch-20 comparison (reference {ref20:.2f}) needs --epochs 20")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help=f"data folder holding mnist/ [${data.DATA_DIR_ENV}]")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=None, help="keep the first N training images (smoke tests)")
    ap.add_argument("--max-test", type=int, default=None,
                    help="keep the first N test images for the per-epoch test ELBO and figures (smoke tests)")
    ap.add_argument("--is-examples", type=int, default=1000,
                    help="importance-sampled log p(x) on the first N test images (0: skip)")
    ap.add_argument("--is-samples", type=int, default=5000, help="K, importance samples per image")
    ap.add_argument("--is-chunk", type=int, default=250, help="samples drawn per vectorised chunk")
    ap.add_argument("--is-batch", type=int, default=20, help="test images per jitted IS call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer", choices=("steps", "fit"), default="steps",
                    help="steps: dlvm_jax.train.fit(scan=False), one jitted step per batch (fast on CPU); fit: "
                         "whole epochs in lax.scan (about 10x slower for this conv net on XLA's CPU backend)")
    ap.add_argument("--checkpoint", default=None, help="write the trained parameters here (msgpack) after each epoch")
    ap.add_argument("--out", default=str(RESULTS / "mnist_conv2d.json"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.epochs < 0 or args.is_examples < 0:
        raise SystemExit("mnist_conv2d: --epochs and --is-examples must be >= 0")
    if min(args.is_samples, args.is_chunk, args.is_batch) < 1:
        raise SystemExit("mnist_conv2d: --is-samples, --is-chunk and --is-batch must be >= 1")

    out = Path(args.out)
    if out.is_dir() or out.suffix != ".json":  # checked before training, not when the results are written
        raise SystemExit(f"mnist_conv2d: --out names the results JSON file (e.g. results/run.json), got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = {name: out.with_name(f"{out.stem}_{name}.png") for name in ("latent", "manifold", "curve")}
    ds = load(args)
    print(f"MNIST thresholded at 127.5: {ds.x_train.shape[0]} training and {ds.x_test.shape[0]} test images "
          f"{ds.x_train.shape[1:]}; mean pixel {ds.x_train.mean():.4f}", flush=True)

    config = VAEConfig(data_shape=(28, 28, 1), latent_dim=2, network="conv", likelihood="bernoulli")
    model = VAE(config)
    optimizer = keras_rmsprop(1e-3)
    loss_fn = make_loss(model)  # the ELBO: analytic KL, one sample of z per image
    k_init, k_train, k_eval, k_is = jax.random.split(jax.random.key(args.seed), 4)
    state = init_state(model.init(k_init), optimizer, k_train)
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(state.params))

    t0 = time.perf_counter()
    # "steps" dispatches one jitted step per batch (fit's scan=False): XLA's CPU backend compiles this conv net's
    # gradients to much slower code inside lax.scan (1.5 s against 14.6 s a step with the decoder's former
    # nn.ConvTranspose, measured on 2 CPU cores; 0.31 s with the phase-decomposed ConvTranspose2x, ~0.24 s with
    # the tap-map form of 2026-12-02, see benchmarks/results/latest.md).
    state, history = fit(state, ds.x_train, loss_fn=loss_fn, optimizer=optimizer, batch_size=BATCH_SIZE,
                         epochs=args.epochs, test_data=ds.x_test, eval_loss_fn=loss_fn, eval_every=1,
                         checkpoint_path=args.checkpoint, progress=args.progress, eval_key=k_eval,
                         scan=args.trainer == "fit")
    train_seconds = time.perf_counter() - t0
    neg_elbo = [-h["test_elbo"] for h in history if h["epoch"] >= 1]
    seconds = [h["seconds"] for h in history]
    per_epoch = [round(b - a, 3) for a, b in zip(seconds, seconds[1:])]
    steps_per_epoch = ds.x_train.shape[0] // BATCH_SIZE
    print("\n".join(compare(neg_elbo)), flush=True)
    print(f"epoch 0 (initialisation): test negative ELBO {-history[0]['test_elbo']:.2f}", flush=True)
    train_only = [h["train_seconds"] for h in history if "train_seconds" in h]  # the stepwise trainer's
    seconds_per_step = None
    if per_epoch:
        steady = (train_only or per_epoch)[1:] or (train_only or per_epoch)  # epoch 1 includes compilation
        seconds_per_step = float(np.median(steady)) / steps_per_epoch
        eval_seconds = float(np.median([a - b for a, b in zip(per_epoch, train_only)])) if train_only else 0.0
        line = (f"training: {train_seconds:.1f} s in all; seconds per epoch ({steps_per_epoch} steps + the test ELBO "
                f"on {ds.x_test.shape[0]} images): {', '.join(f'{v:.1f}' for v in per_epoch)}")
        if len(per_epoch) > 1:
            full = 20 * 600 * seconds_per_step + 21 * eval_seconds * MNIST_TEST_SIZE / ds.x_test.shape[0]
            line += (f"; {seconds_per_step * 1e3:.0f} ms per step (median epoch after the first"
                     f"{f', test ELBO {eval_seconds:.1f} s' if train_only else ''}): at this rate 20 epochs of 600 "
                     f"steps take about {full / 3600:.1f} h")
        else:
            line += " (one epoch, compilation included: run 2 or more for a timing)"
        print(line, flush=True)

    results: dict = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "progress", "checkpoint")},
                   "batch_size": BATCH_SIZE, "optimizer": "rmsprop(lr=1e-3, decay=0.9, eps=1e-7) as Keras",
                   "objective": "ELBO, analytic KL, 1 sample", "binarization": "pixel/255 > 0.5 (pixel > 127.5)"},
        "model": dataclasses.asdict(config), "num_params": num_params,
        "model_note": "network='conv': ConvEncoder (conv 32, 64 stride 2, 64, 64, dense 32, relu) and ConvDecoder "
                      "(dense 14x14x64, transposed conv 32 stride 2, conv 1, relu); hidden/activation are unused",
        "train_examples": int(ds.x_train.shape[0]), "test_examples": int(ds.x_test.shape[0]),
        "epochs": len(neg_elbo),
        "test_neg_elbo_epoch0": -history[0]["test_elbo"],
        "test_neg_elbo": neg_elbo,
        "test_kl": [h["test_kl"] for h in history if h["epoch"] >= 1],
        "train_neg_elbo": [h["train_loss"] for h in history if h["epoch"] >= 1],
        "reference": REFERENCE,
        "below_reference_at_epoch20": (neg_elbo[19] < REFERENCE["test_neg_elbo_epoch20"]) if len(neg_elbo) >= 20
        else None,
        "seconds_per_epoch": per_epoch,
        "seconds_per_epoch_note": "wall seconds per epoch including the test ELBO; the first includes compilation",
        "train_seconds_per_epoch": train_only, "seconds_per_step": seconds_per_step, "trainer": args.trainer,
        "train_seconds": round(train_seconds, 2),
        "machine": machine(), "date": time.strftime("%Y-%m-%d"),
    }
    out.write_text(json.dumps(results, indent=1))  # saved before the (long) IS evaluation

    z = latent_means(model, state.params, ds.x_test)
    plots.latent_scatter(z, ds.y_test, figure["latent"],
                         title=f"means of q(z|x) on {len(z)} MNIST test images after {len(neg_elbo)} epoch(s)")
    canvas, grid = manifold(model, state.params)
    plots.manifold_figure(canvas, grid, figure["manifold"],
                          title="Bernoulli means decoded on the grid Phi^-1(linspace(0.05, 0.95, 20))^2")
    if neg_elbo:
        plots.curve_with_reference(range(1, len(neg_elbo) + 1), neg_elbo, figure["curve"], REFERENCE_POINTS,
                                   title=f"conv VAE, 2-D latent, thresholded MNIST (epoch 0: "
                                         f"{-history[0]['test_elbo']:.1f})",
                                   reference_label="the seeds' Keras model")
    results["figures"] = {k: v.name for k, v in figure.items() if v.exists()}

    n_is = min(args.is_examples, ds.x_test.shape[0])
    if n_is > 0:
        est, first, rest = timed_log_likelihood(model, state.params, ds.x_test[:n_is], k_is,
                                                num_samples=args.is_samples, chunk_size=args.is_chunk,
                                                batch_size=args.is_batch, progress=args.progress)
        is_seconds = first + rest
        s = est.summary()
        batch = min(args.is_batch, n_is)
        later_batches = -(-n_is // batch) - 1
        # Seconds per image without compilation: from the batches after the first, else the first (an upper bound).
        per_image = rest / (later_batches * batch) if later_batches else first / batch
        results.update({
            "is_nll": -s["log_px"], "is_nll_se": s["log_px_se_over_data"], "is_nll_mc_se": s["log_px_mc_se"],
            "is_neg_elbo_same_samples": -s["elbo"], "is_ess_mean": s["ess_mean"],
            "is_examples": n_is, "is_examples_note": f"the first {n_is} of the {MNIST_TEST_SIZE} MNIST test images",
            "is_num_samples": args.is_samples, "is_seconds": round(is_seconds, 2),
            "is_first_batch_seconds": round(first, 2), "is_seconds_per_image": round(per_image, 4),
        })
        print(f"IS log p(x), K={args.is_samples}, first {n_is} test images: NLL {-s['log_px']:.2f} +- "
              f"{s['log_px_se_over_data']:.2f} (s.e. over images; MC s.e. {s['log_px_mc_se']:.3f}; ELBO on the same "
              f"samples {-s['elbo']:.2f}; mean ESS {s['ess_mean']:.0f} of {args.is_samples})", flush=True)
        line = f"IS cost: {is_seconds:.1f} s for {n_is} images (first batch, with compilation, {first:.1f} s)"
        if later_batches:
            k5000 = per_image * 5000 / args.is_samples  # linear in K (the decoder runs K times); rough for small K
            line += (f"; {per_image:.3f} s per image after it: K=5000 would take about {k5000 * 1000 / 3600:.2f} h "
                     f"per 1000 test images, {k5000 * MNIST_TEST_SIZE / 3600:.1f} h for all {MNIST_TEST_SIZE}")
        print(line, flush=True)
    else:
        results.update({"is_nll": None, "is_nll_se": None, "is_examples": 0, "is_num_samples": args.is_samples})
    if args.checkpoint:
        save_params(args.checkpoint, state.params)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} and {', '.join(results['figures'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
