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


def main() -> int:
    for title, path, fn in (
        ("GMVAE spiral clustering", ROOT / "experiments/results/spiral_gmvae.json", spiral_table),
        ("GMVAE train-step throughput", ROOT / "benchmarks/results/gmvae_steps.json", gmvae_bench_table),
        ("VAEs on digits", ROOT / "experiments/results/digits_vae.json", digits_table),
    ):
        res = load(path)
        if res is not None:
            print(f"### {title}\n\n{fn(res)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
