"""Print the README's inference-diagnostics tables (markdown) from experiments/results/diagnostics_*.json.

    python experiments/diagnostics_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"diagnostics_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def gaps_table(res: dict) -> str:
    s, ref = res["summary"], res["reference"]
    rows = [("log p(x), IS from the amortised q, K=5000", "log_px", "log_px"),
            ("log p(x), IS from the refined q*, K=5000", "log_px_refined_q", None),
            ("ELBO(q*), refined q", "elbo_refined", "elbo_refined"),
            ("ELBO(q), amortised q", "elbo_amortised", "elbo_amortised"),
            ("approximation gap, log p(x) from q", "approximation_gap", "approximation_gap"),
            ("approximation gap, log p(x) from q*", "approximation_gap_qstar_is", None),
            ("amortisation gap", "amortisation_gap", "amortisation_gap")]
    lines = ["| quantity (nats per image) | ours (s.e. over images) | Cremer et al. 2018 |", "| --- | --- | --- |"]
    for label, key, ref_key in rows:
        theirs = f"{ref[ref_key]:.2f}" if ref_key else "-"
        lines.append(f"| {label} | {s[key]:.2f} ({s[key + '_se_over_data']:.2f}) | {theirs} |")
    lg = res.get("linear_gaussian")
    if lg:
        lines.append("")
        lines.append("| linear-Gaussian (exact values) | log p(x) | ELBO(q*) | ELBO(q) | approximation gap (max) | "
                     "amortisation gap |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        lines.append(f"| {lg['num_examples']} points | {lg['log_px']:.3f} | {lg['elbo_refined']:.3f} | "
                     f"{lg['elbo_amortised']:.3f} | {lg['approximation_gap']:.1e} ({lg['approximation_gap_max']:.1e}) |"
                     f" {lg['amortisation_gap']:.2f} |")
    return "\n".join(lines)


def estimators_tables(res: dict) -> str:
    names = list(res["estimators"])
    lg = res["linear_gaussian"]
    lines = ["| t (0: crude q, 1: exact posterior) | KL(q \\|\\| p(z\\|x)) | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for r in lg["path"]:
        lines.append(f"| {r['t']:g} | {r['gap']:.2g} | " + " | ".join(f"{r[n]['encoder']:.3g}" for n in names) + " |")
    lines += ["", "| linear-Gaussian, trained with | exact test gap after training | encoder variance at init | "
              "after training |", "| --- | --- | --- | --- |"]
    for n, r in lg["training"]["by_estimator"].items():
        lines.append(f"| {n} | {r['test_gap_exact']:.4f} | {r['variance_init']['encoder']:.3g} | "
                     f"{r['variance_trained']['encoder']:.3g} |")
    mn = res.get("mnist")
    if mn:
        lines += ["", "| MNIST VAE, estimator | encoder variance at init | trained | decoder variance at init | "
                  "trained |" + (f" test ELBO after {mn['training']['epochs']} epochs of training with it |"
                                 if "training" in mn else ""),
                  "| --- | --- | --- | --- | --- |" + (" --- |" if "training" in mn else "")]
        for n, r in mn["variance"].items():
            line = (f"| {n} | {r['init']['encoder']:.3g} | {r['trained']['encoder']:.3g} | "
                    f"{r['init']['decoder']:.3g} | {r['trained']['decoder']:.3g} |")
            if "training" in mn:
                line += f" {mn['training']['by_estimator'][n]['test_elbo_by_epoch'][-1]:.2f} |"
            lines.append(line)
    return "\n".join(lines)


def sampling_table(res: dict) -> str:
    parts = [p for p in ("linear_gaussian", "mnist") if p in res]
    head = "| K | " + " | ".join(f"{res[p]['title']}: naive | IS" for p in parts) + " |"
    lines = [head, "| --- | " + " | ".join("--- | ---" for _ in parts) + " |"]

    def cell(row: dict) -> str:
        sd = "-" if row["mean_spread"] is None else f"{row['mean_spread']:.3f}"
        return f"{row['mean_error']:.3f} ({sd})"

    for i, k in enumerate(res["k"]):
        cells = []
        for p in parts:
            cells += [cell(res[p]["by_k"]["prior"][i]), cell(res[p]["by_k"]["q"][i])]
        lines.append(f"| {k:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def imputation_table(res: dict) -> str:
    lines = ["| method | squared error | error rate | cross-entropy (nats/pixel) |", "| --- | --- | --- | --- |"]
    for name, r in res["errors_on_missing_pixels"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]['mean']:.4f} ({r[k]['se']:.4f})"
                                                 for k in ("squared_error", "error_rate", "cross_entropy")) + " |")
    return "\n".join(lines)


def main() -> int:
    for name, fn in (("gaps", gaps_table), ("estimators", estimators_tables), ("sampling", sampling_table),
                     ("imputation", imputation_table)):
        res = load(name)
        if res is not None:
            print(f"<!-- diagnostics_{name}.json -->\n{fn(res)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
