"""How much a train step's measured throughput varies with the length of the timing window, on this machine.

    python -m benchmarks.profile_noise [--models mlp_vae] [--samples 1] [--seconds 30] [--out FILE]

``python -m benchmarks`` reports each framework's steps/s as the median of 5 timed repeats (``--repeat-seconds``
long) and the ratio of JAX's to PyTorch eager's. On a shared machine the throughput of one process drifts from
fraction of a second to fraction of a second, so the length of a repeat decides how far one run's ratio can fall
from the ratio that many runs agree on. This script runs each framework's train step of ``python -m benchmarks``
(the same worker, the same batch) back to back for ``--seconds``, timed in consecutive windows of ``--window``
seconds, and reports, for windows of 0.1, 0.5, 1 and 2 s (consecutive short windows merged):

* the spread of one window's steps/s (10th and 90th percentiles, min, max, relative to the median);
* the spread of the benchmark's estimate, the ratio of the median of 5 windows of JAX to the median of 5 of PyTorch
  eager (drawn at random, without overlap, from each framework's windows, 2,000 draws): its 5th, 50th and 95th
  percentiles, and how often it falls below the 1.5x target.

Writes ``benchmarks/results/profile_noise.json`` (or ``--out``) with the machine description.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "profile_noise.json"
WINDOWS_S = (0.1, 0.5, 1.0, 2.0)
FRAMEWORKS = ("jax", "torch_eager")


def merged_rates(rates: list[float], k: int) -> np.ndarray:
    """Steps/s over consecutive groups of ``k`` windows of equal step counts (the steps over the summed time)."""
    r = np.asarray(rates, dtype=float)
    n = len(r) // k * k
    return k / np.sum(1.0 / r[:n].reshape(-1, k), axis=1)


def spread(rates: np.ndarray) -> dict[str, float]:
    med = float(np.median(rates))
    p10, p90 = np.percentile(rates, [10, 90])
    return {"windows": int(len(rates)), "median": round(med, 2), "p10": round(float(p10), 2),
            "p90": round(float(p90), 2), "min": round(float(rates.min()), 2), "max": round(float(rates.max()), 2),
            "p90_minus_p10_over_median": round(float((p90 - p10) / med), 3)}


def ratio_of_medians(a: np.ndarray, b: np.ndarray, *, repeats: int = 5, draws: int = 2000, target: float = 1.5,
                     seed: int = 0) -> dict[str, float] | None:
    """The benchmark's estimate, median of ``repeats`` windows of ``a`` over the median of ``repeats`` of ``b``,
    each drawn without overlap: its percentiles over ``draws`` draws and the fraction below ``target``."""
    if len(a) < repeats or len(b) < repeats:
        return None
    rng = np.random.default_rng(seed)

    def median_of_draw(rates: np.ndarray) -> float:
        return float(np.median(rng.choice(rates, repeats, replace=False)))

    ratios = np.array([median_of_draw(a) / median_of_draw(b) for _ in range(draws)])
    p5, p50, p95 = np.percentile(ratios, [5, 50, 95])
    return {"p5": round(float(p5), 3), "p50": round(float(p50), 3), "p95": round(float(p95), 3),
            f"fraction_below_{target}": round(float(np.mean(ratios < target)), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp_vae", help="comma-separated: mlp_vae, gmvae (fast steps)")
    p.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per framework (30)")
    p.add_argument("--window", type=float, default=0.1, help="the shortest window, seconds (0.1)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

    from benchmarks.__main__ import BATCH, parse_args, prepare_data, run_worker
    from benchmarks.common import machine, write_result

    worker_args = parse_args([])
    lengths = [w for w in WINDOWS_S if w >= args.window]
    command = (f"python -m benchmarks.profile_noise --models {args.models} --samples {args.samples} "
               f"--seconds {args.seconds:g} --window {args.window:g}")
    out: dict[str, Any] = {"command": command,
                           "machine": machine(), "seconds": args.seconds, "window_s": args.window, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), worker_args.data_dir, 200)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            raw: dict[str, list[float]] = {}
            for fw in FRAMEWORKS:
                res = run_worker({"kind": "train", "framework": fw, "model": model, "num_samples": args.samples,
                                  "batch_size": BATCH[model], "repeats": int(args.seconds / args.window),
                                  "target_s": args.window, "warmup_s": 2.0,
                                  "data": files["spiral" if model == "gmvae" else "images"]}, worker_args)
                if "error" in res:
                    raise SystemExit(f"{model} {fw}: {res['error']}")
                raw[fw] = res["repeat_steps_per_s"]
            entry: dict[str, Any] = {"num_samples": args.samples, "by_window": {}}
            for length in lengths:
                k = max(1, int(round(length / args.window)))
                rates = {fw: merged_rates(raw[fw], k) for fw in FRAMEWORKS}
                entry["by_window"][f"{length:g}s"] = {
                    **{fw: spread(rates[fw]) for fw in FRAMEWORKS},
                    "ratio_of_medians_of_5": ratio_of_medians(rates["jax"], rates["torch_eager"])}
            entry["window_steps_per_s"] = {fw: [round(r, 2) for r in raw[fw]] for fw in FRAMEWORKS}
            out["models"][model] = entry
            print(f"{model}, M={args.samples}: steps/s of one window (p10-p90) and the ratio of the medians of 5 "
                  "(p5 / p50 / p95, fraction below 1.5)")
            for length, row in entry["by_window"].items():
                r = row["ratio_of_medians_of_5"] or {}
                print(f"  {length:>5}: JAX {row['jax']['p10']:.0f}-{row['jax']['p90']:.0f}, PyTorch eager "
                      f"{row['torch_eager']['p10']:.0f}-{row['torch_eager']['p90']:.0f}; ratio "
                      f"{r.get('p5')} / {r.get('p50')} / {r.get('p95')}, {r.get('fraction_below_1.5')}")
    write_result(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
