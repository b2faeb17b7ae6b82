"""The MNIST VAE that the inference-diagnostics experiments study (train it once; the others load its parameters).

    python experiments/diagnostics_vae.py [--data-dir DIR] [--epochs 200] [--time-limit 1200]

Model: VAEConfig() = the one-stochastic-layer VAE of the IWAE paper, 784-200-200-50 (tanh), Bernoulli
likelihood, factorised Gaussian q(z | x); decoder output bias initialised to the logit of the mean training image.
Data: the 60,000 MNIST training images (grey levels / 255, ``DIR/mnist``) binarized dynamically (a fresh Bernoulli
draw per minibatch, as in the IWAE paper); evaluation on Larochelle & Murray's fixed binarization of the 10,000 test
images (``DIR/binarized_mnist``), the data set of the published numbers. Training: the ELBO (analytic KL, one
sample), Adam with a cosine decay of the learning rate from 1e-3 to 1e-4 over ``--epochs``, batch 100; stops early
after the epoch that passes ``--time-limit`` seconds (the JSON records the epochs actually run).

Writes the parameters (msgpack) to ``--params`` (default runs/diagnostics_vae.msgpack, not tracked by git) and the
training record to ``--out`` (default experiments/results/diagnostics_vae.json).
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
from typing import Any

import jax
import numpy as np
import optax

from dlvm_jax import data
from dlvm_jax.models.vae import VAE, VAEConfig
from dlvm_jax.objectives import make_loss
from dlvm_jax.train import fit, init_state, load_params, save_params

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DEFAULT_PARAMS = ROOT / "runs" / "diagnostics_vae.msgpack"
BATCH_SIZE = 100


def machine() -> dict[str, Any]:
    """CPU model, core count, load and versions, for the JSON records."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1_5_15min": load, "python": sys.version.split()[0],
            "jax": jax.__version__, "optax": optax.__version__, "backend": jax.default_backend(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def test_images(data_dir: str | None, prefix: str) -> np.ndarray:
    """Larochelle & Murray's binarized MNIST test images (10,000 x 784 in {0, 1}); SystemExit with one line if
    the files are missing."""
    try:
        return data.binarized_mnist(data_dir).x_test
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{prefix}: {err}") from None


def test_subset(data_dir: str | None, num: int, seed: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``num`` binarized test images drawn without replacement, in the order of a fixed permutation by ``seed``
    (the file is sorted by class, so its first rows would all be zeros), and their row indices."""
    x = test_images(data_dir, prefix)
    if not 1 <= num <= x.shape[0]:
        raise SystemExit(f"{prefix}: the number of test images must be in 1..{x.shape[0]}, got {num}")
    rows = np.random.default_rng(seed).permutation(x.shape[0])[:num]
    return x[rows], rows


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """--data-dir, --params, --record, --no-progress for the scripts that load the trained VAE."""
    ap.add_argument("--data-dir", default=None, help=f"folder holding binarized_mnist/ and mnist/ [${data.DATA_DIR_ENV}]")
    ap.add_argument("--params", default=str(DEFAULT_PARAMS), help="trained VAE parameters (diagnostics_vae.py)")
    ap.add_argument("--record", default=str(RESULTS / "diagnostics_vae.json"), help="its training record")
    ap.add_argument("--no-progress", dest="progress", action="store_false")


def train_images(data_dir: str | None, prefix: str) -> np.ndarray:
    """MNIST training images as grey levels in [0, 1] (60,000 x 784), to binarize dynamically."""
    try:
        return data.mnist(data_dir).x_train
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"{prefix}: {err}") from None


def model_from_record(record: dict[str, Any]) -> VAE:
    cfg = dict(record["model_config"])
    cfg["data_shape"], cfg["hidden"] = tuple(cfg["data_shape"]), tuple(cfg["hidden"])
    return VAE(VAEConfig(**cfg))


def load_vae(params_path: str | os.PathLike, record_path: str | os.PathLike, prefix: str) -> tuple[VAE, Any, dict]:
    """The trained model, its parameters and its training record; SystemExit naming the command that makes them."""
    params_path, record_path = Path(params_path), Path(record_path)
    if not params_path.is_file() or not record_path.is_file():
        raise SystemExit(f"{prefix}: no trained VAE at {params_path} (record {record_path}); run "
                         f"`python experiments/diagnostics_vae.py --params {params_path}` first")
    record = json.loads(record_path.read_text())
    model = model_from_record(record)
    params = load_params(params_path, model.init(jax.random.key(0)))
    return model, params, record


def dynamic_loss(model: VAE):
    """The ELBO loss on a fresh Bernoulli binarization of each minibatch of grey-level images."""
    base = make_loss(model)

    def loss_fn(params, batch, key, step):
        k_bin, k_loss = jax.random.split(key)
        return base(params, data.dynamic_binarize(k_bin, batch), k_loss, step)

    return loss_fn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help=f"folder holding mnist/ and binarized_mnist/ [${data.DATA_DIR_ENV}]")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=1200.0, help="stop after the epoch that passes this (s)")
    ap.add_argument("--max-train", type=int, default=None, help="keep the first N training images (smoke tests)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--params", default=str(DEFAULT_PARAMS), help="msgpack file for the trained parameters")
    ap.add_argument("--out", default=str(RESULTS / "diagnostics_vae.json"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("diagnostics_vae: --epochs must be >= 1")
    x_train = train_images(args.data_dir, "diagnostics_vae")
    if args.max_train is not None:
        x_train = x_train[: max(args.max_train, BATCH_SIZE)]
    x_test = test_images(args.data_dir, "diagnostics_vae")
    config = VAEConfig()
    model = VAE(config)
    steps = args.epochs * (x_train.shape[0] // BATCH_SIZE)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-3, steps, alpha=0.1))
    k_init, k_train, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    state = init_state(model.init(k_init, data_mean=x_train.mean(0)), optimizer, k_train)
    params_path = Path(args.params)
    params_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state, history = fit(state, x_train, loss_fn=dynamic_loss(model), eval_loss_fn=make_loss(model),
                         optimizer=optimizer, batch_size=BATCH_SIZE, epochs=args.epochs, test_data=x_test,
                         eval_every=args.eval_every, time_limit=args.time_limit, progress=args.progress,
                         eval_key=k_eval, checkpoint_path=params_path)
    seconds = time.perf_counter() - t0
    save_params(params_path, state.params)
    record = {
        "model_config": dataclasses.asdict(config),
        "data": {"train": f"MNIST training images ({x_train.shape[0]}), dynamically binarized per minibatch",
                 "test": "binarized MNIST test set (Larochelle & Murray), 10,000 images"},
        "training": {"objective": "ELBO, analytic KL, 1 sample", "optimizer": "adam, cosine decay 1e-3 -> 1e-4",
                     "batch_size": BATCH_SIZE, "epochs_requested": args.epochs, "epochs_run": history[-1]["epoch"],
                     "steps": history[-1]["step"], "time_limit_s": args.time_limit, "seconds": round(seconds, 1),
                     "seed": args.seed},
        "test_elbo_by_epoch": {str(h["epoch"]): h["test_elbo"] for h in history},
        "final_test_elbo": history[-1]["test_elbo"], "final_test_kl": history[-1]["test_kl"],
        "params_file": os.path.relpath(params_path, ROOT) if params_path.is_absolute() else str(params_path),
        "machine": machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"test ELBO {history[0]['test_elbo']:.2f} -> {history[-1]['test_elbo']:.2f} after {history[-1]['epoch']} "
          f"epochs ({seconds:.0f} s); wrote {params_path} and {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
