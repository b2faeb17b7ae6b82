"""Print the README's results tables (markdown) from the JSON files in experiments/results and benchmarks/results.

    python experiments/tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def spiral_table(res: dict) -> str:
    lines = ["| data | method | seeds with accuracy >= 0.95 | accuracy mean (min-max) | NMI mean | seconds per seed (max) "
             "| single restarts with accuracy >= 0.95 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("paper", "generated"):
        if name not in res:
            continue
        rows = [("GMVAE (ours, 4 restarts)", res[name])] + [
            (label, res[name]["baselines"][key]) for label, key in (("k-means", "kmeans"),
                                                                  ("Gaussian mixture", "gaussian_mixture"))]
        for label, r in rows:
            acc = np.array(r["accuracy"])
            sec = np.array(r["seconds"])
            single = "-"
            if "restart_accuracy" in r:
                ra = np.array(r["restart_accuracy"])
                single = f"{(ra >= 0.95).sum()}/{ra.size}"
            lines.append(f"| {name} | {label} | {(acc >= 0.95).sum()}/{acc.size} | {acc.mean():.4f} "
                         f"({acc.min():.4f}-{acc.max():.4f}) | {np.mean(r['nmi']):.4f} | {sec.mean():.1f} "
                         f"({sec.max():.1f}) | {single} |")
    return "\n".join(lines)


def gmvae_bench_table(res: dict) -> str:
    lines = ["| M (samples) | steps/s, scan over an epoch | steps/s, one dispatch per step | compile (s) |",
             "| --- | --- | --- | --- |"]
    for r in res["settings"]:
        lines.append(f"| {r['num_samples']} | {r['steps_per_s_scan_epoch']:.0f} | "
                     f"{r['steps_per_s_dispatch_per_step']:.0f} | {r['compile_seconds_epoch']:.2f} |")
    m = res["machine"]
    return "\n".join(lines) + f"\n\n{m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['backend']}), {m['date']}."


def digits_table(res: dict) -> str:
    lines = ["| likelihood | objective | test ELBO at init | test ELBO after training | log p(x), K=5000 (s.e.) | ESS | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        obj = r["objective"] if r["objective"] == "elbo" else f"iwae K={r['num_samples']}"
        lines.append(f"| {r['likelihood']} | {obj} | {r['initial_test_elbo']:.2f} | {r['final_test_elbo']:.2f} | "
                     f"{r['log_px']:.2f} ({r['log_px_se_over_data']:.2f}) | {r['ess_mean']:.0f} | "
                     f"{r['train_seconds']:.1f} |")
    return "\n".join(lines)


def conv2d_table(res: dict) -> str:
    ref = res["reference"]
    neg = res["test_neg_elbo"]
    best = int(np.argmin(neg))
    lines = ["| | ours (JAX) | the seeds' Keras model |", "| --- | --- | --- |"]
    lines.append(f"| test negative ELBO after epoch 1 | {neg[0]:.2f} | {ref['test_neg_elbo_epoch1']:.2f} |")
    if len(neg) >= 20:
        lines.append(f"| test negative ELBO after epoch 20 | {neg[19]:.2f} | {ref['test_neg_elbo_epoch20']:.2f} |")
    lines.append(f"| best test negative ELBO (epoch) | {neg[best]:.2f} ({best + 1}) | {ref['best_test_neg_elbo']:.2f} "
                 f"({ref['best_epoch']}) |")
    if res.get("is_nll") is not None:
        lines.append(f"| IS negative log-likelihood, K={res['is_num_samples']}, first {res['is_examples']} test "
                     f"images (s.e.) | {res['is_nll']:.2f} ({res['is_nll_se']:.2f}) | - |")
    m = res["machine"]
    return "\n".join(lines) + (f"\n\n{res['epochs']} epochs of 600 steps, {res['train_seconds'] / 60:.0f} min of "
                               f"training on {m['cpu']} ({m['cores']} cores, {m['backend']}), {res['date']}.")


def iwae_table(res: dict) -> str:
    lines = ["| model | epochs (ours) | test NLL, ours (s.e.) | test NLL, Burda et al. (3280 epochs) | active units "
             "| training minutes |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        paper = "-" if r["paper_nll"] is None else f"{r['paper_nll']:.2f}"
        lines.append(f"| {r['objective'].upper()} k={r['k']} | {r['epochs']} | {r['test_nll']:.2f} "
                     f"({r['test_nll_stderr']:.2f}) | {paper} | {r['active_units']} | {r['train_seconds'] / 60:.0f} |")
    m = res["machine"]
    first = res["rows"][0]
    return "\n".join(lines) + (f"\n\nK={first['is_samples']} on the {first['is_examples']} test images; {m['cpu']} "
                               f"({m['cores']} cores, {m['backend']}).")


def mnist_gmvae_table(res: dict) -> str:
    """Per K: the paper's many-to-one accuracy, then ours (mean +- std over seeds) for the GMVAE runs and the
    raw-pixel baselines present in the file."""
    lines = ["| K | method | runs | many-to-one accuracy % | Hungarian accuracy % | NMI |",
             "| --- | --- | --- | --- | --- | --- |"]

    def stat(recs: list[dict], key: str, scale: float = 100.0) -> str:
        v = scale * np.asarray([r[key] for r in recs])
        return f"{v.mean():.2f} +- {v.std():.2f}" if len(v) > 1 else f"{v.mean():.2f}"

    ks = sorted({*res.get("runs", {}), *res.get("baselines", {})}, key=int)
    for k in ks:
        paper = res["paper_many_to_one_percent"].get(k)
        if paper:
            lines.append(f"| {k} | GMVAE, Dilokthanakul et al. (M=1) | - | {paper['M=1']} | - | - |")
        runs = res.get("runs", {}).get(k, [])
        epochs = sorted({r.get("epochs") for r in runs} - {None})
        budget = f", {'/'.join(map(str, epochs))} epochs" if epochs else ""
        recipe = res.get("config", {}).get("recipe", "paper")
        label = {"paper": "paper code's setting", "pretrained": "pretrained init"}.get(recipe, recipe)
        at_init = [r["at_init"] for r in runs if "at_init" in r]
        for name, recs in ((f"GMVAE (ours, {label}, M=1{budget})", runs),
                           *((("its init alone (autoencoder + GMM on its latents)", at_init),)
                             if at_init else ()),
                           *((f"{b} on raw pixels", v) for b, v in res.get("baselines", {}).get(k, {}).items())):
            if recs:
                lines.append(f"| {k} | {name.replace('_', ' ')} | {len(recs)} | {stat(recs, 'accuracy_many_to_one')} | "
                             f"{stat(recs, 'accuracy_hungarian')} | {stat(recs, 'nmi', 1.0)} |")
    return "\n".join(lines)


def main() -> int:
    for title, path, fn in (
        ("GMVAE spiral clustering", ROOT / "experiments/results/spiral_gmvae.json", spiral_table),
        ("GMVAE train-step throughput", ROOT / "benchmarks/results/gmvae_steps.json", gmvae_bench_table),
        ("VAEs on digits", ROOT / "experiments/results/digits_vae.json", digits_table),
        ("The seeds' convolutional VAE on thresholded MNIST", ROOT / "experiments/results/mnist_conv2d.json",
         conv2d_table),
        ("The IWAE table, one stochastic layer", ROOT / "experiments/results/iwae_table.json", iwae_table),
        ("GMVAE clustering of MNIST", ROOT / "experiments/results/mnist_gmvae.json", mnist_gmvae_table),
        ("GMVAE clustering of MNIST, the paper code's setting", ROOT / "experiments/results/mnist_gmvae_paper.json",
         mnist_gmvae_table),
    ):
        res = load(path)
        if res is not None:
            print(f"### {title}\n\n{fn(res)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
