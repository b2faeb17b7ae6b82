"""The IWAE table (Burda, Grosse & Salakhutdinov 2015), one stochastic layer, on dynamically binarized MNIST.

    python experiments/iwae_table.py [--data-dir DIR] [--rows vae:1,iwae:5,iwae:50] [--epochs 121]
                                     [--row-minutes 60] [--schedule truncated|published]

Model: VAEConfig(data_shape=(784,), latent_dim=50, hidden=(200, 200), activation="tanh", likelihood="bernoulli"),
the decoder's output bias set to the logit of the mean training image. Data: MNIST grey levels / 255 (``DIR/mnist``,
``--data-dir`` or ``$DLVM_DATA_DIR``); every training batch is binarized afresh, ``b ~ Bernoulli(pixel)``, with a
key drawn from the step's key (dynamic binarization); the test set is binarized once with a fixed key.

Training, as Burda et al.'s code: batch 20, Adam(beta1 0.9, beta2 0.999, eps 1e-4), learning rate
1e-3 * 10^(-i/7) in stage i, stage i lasting 3^i epochs. ``--schedule published`` runs all 8 stages (3280 epochs);
the default runs the same schedule stopped after ``--epochs`` epochs (121 = stages 0-4) or ``--row-minutes`` of
training, whichever comes first. Row ``vae:k`` trains the ELBO averaged over k samples (analytic KL), ``iwae:k``
the k-sample importance-weighted bound.

Evaluation: the importance-sampled log p(x) with K = ``--is-samples`` (5000) on the ``--is-examples`` (all 10,000)
test images; the test NLL is its negative mean, with its standard error over images. Also the number of active
units (latent dimensions whose posterior mean varies over the test set with variance above 0.01).

Writes ``--out`` (experiments/results/iwae_table.json; rows merge into an existing file by (objective, k), and the
file is rewritten after each row) and ``<stem>.png`` (the test bound per epoch and the final NLL beside the paper).
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

from dlvm_jax import data
from dlvm_jax.likelihood import log_likelihood
from dlvm_jax.models.vae import VAE, VAEConfig
from dlvm_jax.objectives import make_loss
from dlvm_jax.train import fit, init_state, save_params

RESULTS = Path(__file__).resolve().parent / "results"

#: Burda et al. 2015, Table 1, one stochastic layer: test NLL in nats (K = 5000), after 3280 epochs.
PAPER_NLL = {("vae", 1): 86.76, ("vae", 5): 86.47, ("vae", 50): 86.35, ("iwae", 5): 85.54, ("iwae", 50): 84.78}
PAPER_EPOCHS = 3280
NUM_STAGES = 8
BATCH_SIZE = 20


def stage_epochs(num_stages: int = NUM_STAGES) -> list[int]:
    """Epochs per stage of the published schedule: 3^i for i = 0..num_stages-1 (1, 3, 9, ..., 2187)."""
    return [3 ** i for i in range(num_stages)]


def learning_rate(steps_per_epoch: int, base: float = 1e-3) -> optax.Schedule:
    """1e-3 * 10^(-i/7) in stage i (stage i lasts 3^i epochs), as a function of the step."""
    boundaries = np.cumsum(stage_epochs())[:-1] * steps_per_epoch
    return optax.piecewise_constant_schedule(base, {int(b): 10 ** (-1 / 7) for b in boundaries})


def dynamically_binarized(loss_fn):
    """Wrap a loss so each batch is a fresh Bernoulli draw of its grey levels (key split off the step's key)."""

    def wrapped(params, batch, key, step):
        k_bin, k_loss = jax.random.split(key)
        return loss_fn(params, data.dynamic_binarize(k_bin, batch), k_loss, step)

    return wrapped


def parse_rows(text: str) -> list[tuple[str, int]]:
    rows = []
    for item in text.split(","):
        objective, _, k = item.strip().partition(":")
        if objective not in ("vae", "iwae") or not k.isdigit() or int(k) < 1:
            raise SystemExit(f"iwae_table: error: bad row {item!r}; write rows as vae:K or iwae:K, e.g. vae:1,iwae:5")
        rows.append((objective, int(k)))
    return rows


def active_units(model: VAE, params, x: np.ndarray, threshold: float = 0.01) -> int:
    means = jax.jit(lambda p, b: model.encode(p, b).mean())
    mu = np.concatenate([np.asarray(means(params, x[i:i + 1000])) for i in range(0, len(x), 1000)])
    return int(np.sum(mu.var(axis=0) > threshold))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "backend": jax.default_backend(), "load_average_at_start": list(os.getloadavg())}


def run_row(objective: str, k: int, args: argparse.Namespace, x_train: np.ndarray, x_test_bin: np.ndarray) -> dict:
    config = VAEConfig(data_shape=(784,), latent_dim=50, hidden=(200, 200), activation="tanh", likelihood="bernoulli")
    model = VAE(config)
    steps_per_epoch = x_train.shape[0] // BATCH_SIZE
    optimizer = optax.adam(learning_rate(steps_per_epoch), b1=0.9, b2=0.999, eps=1e-4)
    bound = make_loss(model, objective="elbo" if objective == "vae" else "iwae", num_samples=k)
    key = jax.random.fold_in(jax.random.key(args.seed), k + (1000 if objective == "iwae" else 0))
    k_init, k_train, k_eval, k_is = jax.random.split(key, 4)
    state = init_state(model.init(k_init, jnp.asarray(x_train.mean(axis=0))), optimizer, k_train)
    epochs = sum(stage_epochs()) if args.schedule == "published" else args.epochs
    time_limit = None if args.schedule == "published" else 60.0 * args.row_minutes
    print(f"[{objective} k={k}] training up to {epochs} epochs ({steps_per_epoch} steps each)"
          + (f", at most {args.row_minutes:g} min" if time_limit else ""), flush=True)
    t0 = time.perf_counter()
    state, history = fit(state, x_train, loss_fn=dynamically_binarized(bound), optimizer=optimizer,
                         batch_size=BATCH_SIZE, epochs=epochs, test_data=x_test_bin, eval_loss_fn=bound,
                         eval_every=args.eval_every, time_limit=time_limit, progress=args.progress, eval_key=k_eval)
    train_seconds = time.perf_counter() - t0
    epochs_done = history[-1]["epoch"]
    if args.checkpoint_dir:
        save_params(Path(args.checkpoint_dir) / f"iwae_table_{objective}{k}.msgpack", state.params)
    t0 = time.perf_counter()
    x_is = x_test_bin[:args.is_examples]
    est = log_likelihood(model, state.params, x_is, k_is, num_samples=args.is_samples, chunk_size=args.is_chunk,
                         batch_size=args.is_batch, progress=args.progress)
    eval_seconds = time.perf_counter() - t0
    log_px = np.asarray(est.log_px, np.float64)
    row = {
        "objective": objective, "k": k, "epochs": epochs_done, "steps": int(state.step),
        "test_nll": float(-log_px.mean()), "test_nll_stderr": float(log_px.std(ddof=1) / np.sqrt(log_px.size)),
        "test_elbo_k5000_mean": float(np.mean(est.elbo)), "is_samples": args.is_samples, "is_examples": int(x_is.shape[0]),
        "mean_ess": float(np.mean(est.ess)), "active_units": active_units(model, state.params, x_is),
        "paper_nll": PAPER_NLL.get((objective, k)), "paper_epochs": PAPER_EPOCHS,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "history": [{"epoch": h["epoch"], "test_bound": h["test_loss"] * -1.0, "train_loss": h.get("train_loss")}
                    for h in history],
    }
    print(f"[{objective} k={k}] {epochs_done} epochs in {train_seconds / 60:.1f} min: test NLL {row['test_nll']:.2f} "
          f"+- {row['test_nll_stderr']:.2f} (paper {row['paper_nll']} after {PAPER_EPOCHS} epochs), "
          f"{row['active_units']} active units; IS evaluation {eval_seconds:.0f} s", flush=True)
    return row


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, row in enumerate(results["rows"]):
        color = f"C{i}"
        name = f"{row['objective'].upper()} k={row['k']}"
        hist = [h for h in row["history"] if h["epoch"] >= 1]
        a.plot([h["epoch"] for h in hist], [-h["test_bound"] for h in hist], color=color, label=f"{name}: -bound")
        a.plot([row["epochs"]], [row["test_nll"]], "o", color=color, label=f"{name}: NLL, K={row['is_samples']}")
        b.bar(i - 0.2, row["test_nll"], 0.4, color=color, label="ours" if i == 0 else None)
        if row["paper_nll"] is not None:
            b.bar(i + 0.2, row["paper_nll"], 0.4, color=color, alpha=0.35, hatch="//",
                  label="Burda et al. (3280 epochs)" if i == 0 else None)
    a.set_xscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("nats per test image")
    a.set_title("test bound during training (k-sample), final IS NLL")
    a.legend(fontsize=7)
    names = [f"{r['objective'].upper()} k={r['k']}\n{r['epochs']} epochs" for r in results["rows"]]
    b.set_xticks(range(len(names)), names)
    lo = min(min(r["test_nll"] for r in results["rows"]), 84.0) - 1
    b.set_ylim(lo, max(r["test_nll"] for r in results["rows"]) + 1)
    b.set_ylabel("test NLL (nats), K=5000")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help=f"data folder holding mnist/ [${data.DATA_DIR_ENV}]")
    ap.add_argument("--rows", default="vae:1,iwae:5,iwae:50", help="comma-separated OBJECTIVE:K, OBJECTIVE vae|iwae")
    ap.add_argument("--schedule", choices=("truncated", "published"), default="truncated",
                    help="published: all 8 stages (3280 epochs, no time limit); truncated: stop at --epochs or "
                         "--row-minutes")
    ap.add_argument("--epochs", type=int, default=121, help="epochs per row with --schedule truncated (121 = stages 0-4)")
    ap.add_argument("--row-minutes", type=float, default=60.0, help="training time limit per row (truncated schedule)")
    ap.add_argument("--eval-every", type=int, default=10, help="epochs between test-bound evaluations")
    ap.add_argument("--max-train", type=int, default=None, help="keep the first N training images (smoke tests)")
    ap.add_argument("--max-test", type=int, default=None, help="keep the first N test images (smoke tests)")
    ap.add_argument("--is-examples", type=int, default=10_000, help="test images in the IS evaluation")
    ap.add_argument("--is-samples", type=int, default=5000, help="K, importance samples per test image")
    ap.add_argument("--is-chunk", type=int, default=500)
    ap.add_argument("--is-batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir", default=None, help="write each row's trained parameters here (msgpack)")
    ap.add_argument("--out", default=str(RESULTS / "iwae_table.json"))
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    rows = parse_rows(args.rows)

    ds = data.mnist(data.data_dir(args.data_dir))  # grey levels / 255 in [0, 1], flat
    x_train = np.asarray(ds.x_train, np.float32)[:args.max_train]
    x_test_bin = np.asarray(data.dynamic_binarize(jax.random.key(2015), ds.x_test), np.float32)[:args.max_test]
    print(f"MNIST: {x_train.shape[0]} training images (binarized afresh each batch), {x_test_bin.shape[0]} test "
          f"images (binarized once)", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    results.update({
        "model": "784-200-200-50 tanh, Bernoulli decoder, one stochastic layer",
        "protocol": {"batch_size": BATCH_SIZE, "optimizer": "adam(b1=0.9, b2=0.999, eps=1e-4)",
                     "learning_rate": "1e-3 * 10^(-i/7) in stage i of 3^i epochs", "binarization": "dynamic",
                     "vae_kl": "analytic"},
        "machine": machine(),
    })
    for objective, k in rows:
        row = run_row(objective, k, args, x_train, x_test_bin)
        row["config"] = {"schedule": args.schedule, "epochs_asked": args.epochs, "row_minutes": args.row_minutes,
                         "seed": args.seed, "max_train": args.max_train,
                         "max_test": args.max_test}
        results["rows"] = [r for r in results["rows"] if (r["objective"], r["k"]) != (objective, k)] + [row]
        results["rows"].sort(key=lambda r: (r["objective"] != "vae", r["k"]))
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)
        figure(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
