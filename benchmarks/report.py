"""The markdown table and bar chart of ``python -m benchmarks`` (from the results dict written to latest.json).

    python -m benchmarks.report [benchmarks/results/latest.json]   # rewrite latest.md and latest.png from the JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

LABELS = {"mlp_vae": "MLP VAE", "conv_vae": "conv VAE", "gmvae": "GMVAE"}


def _f(x: Any, fmt: str = "{:.0f}") -> str:
    if x is None:
        return "-"
    return fmt.format(x)


def _num(x: float | None) -> str:
    """Throughputs: 3 significant digits, no exponent below 1e7."""
    if x is None:
        return "-"
    if x >= 1e7:
        return f"{x:.3g}"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _rss(d: dict[str, Any], keys: tuple[str, ...]) -> str:
    return " / ".join(_f(d.get(k)) for k in keys)


def _steps(setting: dict[str, Any], fw: str) -> str:
    """A framework's steps/s in a train setting, with the microbatch size it was fastest at (if not the whole
    batch)."""
    size = (setting.get("microbatch") or {}).get(fw)
    return _num(setting[f"{fw}_steps_per_s"]) + (f" (mb {size})" if size else "")


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    peak = results["matmul_peak"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; device {m['device']} (PyTorch: {m.get('torch_device', '-')}); "
        f"jax {m['jax']}, flax {m['flax']}, "
        f"torch {m['torch']}; {m['date']}. Command: `{results['command'].strip()}`.",
        f"Load average (1, 5, 15 min) at the start {m['load_average_start']}, at the end {m['load_average_end']}"
        + (f"; PyTorch ran with OMP_WAIT_POLICY={m['torch_omp_wait_policy']}"
           if m.get("torch_omp_wait_policy", "default") != "default" else "") + "."
        + (f" Malloc: {m['malloc']}." if m.get("malloc", "defaults") != "defaults" else "")
        + (f" Microbatches: {m['microbatch']}." if m.get("microbatch", "none") != "none" else "")
        + (" The frameworks' train-step repeats alternated between their live workers (--interleave)."
           if m.get("interleave") else ""),
        f"Float32 matmul peak ({peak['n']}x{peak['n']}, best of 5): JAX {_f(peak['jax_gflops'])} GFLOP/s, PyTorch "
        f"{_f(peak['torch_gflops'])} GFLOP/s; the fractions below are of {_f(peak['peak_gflops'])} GFLOP/s. "
        f"Data: {results['data']['images']}; {results['data']['spiral']}.",
        *([f"Note: {results['note']}."] if results.get("note") else []),
        "",
        "Train-step throughput (steps/s, median of the repeats; batch 100 for the VAEs, 200 for the GMVAE; VAEs: "
        "ELBO with M=1, IWAE with M=10):",
        "",
        "| model | M | JAX | torch eager | torch.compile | JAX / eager | JAX / compile | JAX compile (s) "
        "| torch.compile (s) | GFLOP/step | JAX % of peak | peak RSS MB (JAX / eager / compile) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    is_rows = []
    errors = []
    by_size: list[tuple[str, dict[str, Any]]] = []
    for model, settings in results["models"].items():
        for name, s in settings.items():
            if name.startswith("train"):
                if "steps_per_s_by_microbatch" in s:
                    by_size.append((model, s))
                lines.append(
                    f"| {LABELS[model]} | {s['num_samples']} | {_steps(s, 'jax')} | "
                    f"{_steps(s, 'torch_eager')} | {_steps(s, 'torch_compile')} | "
                    f"{_f(s['ratio_vs_eager'], '{:.2f}')} | {_f(s['ratio_vs_compile'], '{:.2f}')} | "
                    f"{_f(s['jax_compile_s'], '{:.1f}')} | {_f(s['torch_compile_s'], '{:.1f}')} | "
                    f"{_f(s['gflop_per_step'], '{:.3g}')} | {_pct(s['fraction_of_matmul_peak'])} | "
                    f"{_rss(s['peak_rss_mb'], ('jax', 'torch_eager', 'torch_compile'))} |")
                if s.get("torch_compile_error"):
                    errors.append(f"{LABELS[model]} M={s['num_samples']} torch.compile: {s['torch_compile_error']}")
                for fw, e in s.get("errors", {}).items():
                    errors.append(f"{LABELS[model]} M={s['num_samples']} {fw}: {e}")
            else:
                is_rows.append(
                    f"| {LABELS[model]} | {s['num_samples']} | {s['images']} | {_num(s['jax_logw_per_s'])} | "
                    f"{_num(s['torch_logw_per_s'])} | {_f(s['ratio_vs_torch'], '{:.2f}')} | "
                    f"{_f(s['mflop_per_logw'], '{:.3g}')} | {_pct(s['fraction_of_matmul_peak'])} | "
                    f"{_pct(s.get('fraction_of_adjacent_matmul_peak'))} | "
                    f"{_pct(s['torch_fraction_of_matmul_peak'])} | {_f(s['jax_compile_s'], '{:.1f}')} | "
                    f"{_rss(s['peak_rss_mb'], ('jax', 'torch'))} |")
                for fw, e in s.get("errors", {}).items():
                    errors.append(f"{LABELS[model]} IS {fw}: {e}")
    epochs = [(model, s) for model, settings in results["models"].items() for name, s in settings.items()
              if name.startswith("train") and s.get("jax_epoch_steps_per_s")]
    if epochs:
        lines += [
            "",
            "JAX as `fit` trains these models: one jitted `lax.scan` per epoch over the data's shuffled batches "
            "(`make_epoch`), per step, against the same PyTorch eager steps (not a target: the targets are on the "
            "steps above):",
            "",
            "| model | M | JAX step | JAX scanned epoch, per step | torch eager | JAX epoch / eager |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for model, s in epochs:
            lines.append(f"| {LABELS[model]} | {s['num_samples']} | {_num(s['jax_steps_per_s'])} | "
                         f"{_num(s['jax_epoch_steps_per_s'])} | {_num(s['torch_eager_steps_per_s'])} | "
                         f"{_f(s.get('epoch_ratio_vs_eager'), '{:.2f}')} |")
    if by_size:
        lines += [
            "",
            "Each framework's train steps by microbatch size (steps/s; the gradient accumulated over microbatches of "
            "that many examples, 0: the whole batch at once; above, each framework's fastest, mb: its size):",
            "",
            "| model | M | microbatch | JAX | torch eager | torch.compile | JAX / eager |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for model, s in by_size:
            for size, row in s["steps_per_s_by_microbatch"].items():
                ratio = (row["jax"] / row["torch_eager"] if row.get("jax") and row.get("torch_eager") else None)
                lines.append(f"| {LABELS[model]} | {s['num_samples']} | {size} | {_num(row.get('jax'))} | "
                             f"{_num(row.get('torch_eager'))} | {_num(row.get('torch_compile'))} | "
                             f"{_f(ratio, '{:.2f}')} |")
    lines += [
        "",
        "Importance-sampled log-likelihood throughput (log-weights/s; K samples per image; JAX's FLOP/s also against "
        "its matmul peak sampled between its IS batches, the same minutes):",
        "",
        "| model | K | images | JAX | PyTorch | JAX / PyTorch | MFLOP / log-weight | JAX % of peak "
        "| JAX % of peak sampled alongside | PyTorch % of peak | JAX compile (s) | peak RSS MB (JAX / PyTorch) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *is_rows,
        "",
        "Targets:",
        "",
    ]
    for t in results["targets"]:
        v = t["value"]
        shown = "-" if v is None else (_pct(v) if "peak" in t["what"] else f"{v:.2f}")
        goal = _pct(t["target"]) if "peak" in t["what"] else f"{t['target']:.1f}"
        lines.append(f"- {LABELS[t['model']]} {t['setting']}: {t['what']} = {shown} (target >= {goal}): "
                     f"{'met' if t['met'] else 'MISSED'}")
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: str | Path) -> None:
    """Speed-up over PyTorch eager of JAX and torch.compile per setting (log scale), train steps and IS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    train, is_ = [], []
    for model, settings in results["models"].items():
        for name, s in settings.items():
            if name.startswith("train"):
                eager = s["torch_eager_steps_per_s"]
                train.append((f"{LABELS[model]}\nM={s['num_samples']}",
                              s["jax_steps_per_s"] / eager if eager and s["jax_steps_per_s"] else np.nan,
                              s["torch_compile_steps_per_s"] / eager if eager and s["torch_compile_steps_per_s"]
                              else np.nan))
            else:
                is_.append((f"{LABELS[model]}\nK={s['num_samples']}", s["ratio_vs_torch"] or np.nan))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [max(len(train), 1),
                                                                                     max(len(is_), 1) + 1]})
    ax = axes[0]
    x = np.arange(len(train))
    ax.bar(x - 0.2, [t[1] for t in train], 0.4, label="JAX (jit)", color="tab:blue")
    ax.bar(x + 0.2, [t[2] for t in train], 0.4, label="torch.compile", color="tab:orange")
    ax.axhline(1.0, color="k", lw=1, label="torch eager")
    ax.axhline(1.5, color="tab:red", lw=1, ls="--", label="target 1.5x")
    ax.set_xticks(x, [t[0] for t in train], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("train steps/s relative to torch eager")
    ax.set_title("Train-step throughput")
    ax.legend(fontsize=8)
    ax = axes[1]
    x = np.arange(len(is_))
    ax.bar(x, [t[1] for t in is_], 0.5, color="tab:blue", label="JAX (vmap, lax.map)")
    ax.axhline(1.0, color="k", lw=1, label="PyTorch")
    ax.axhline(2.0, color="tab:red", lw=1, ls="--", label="target 2x")
    ax.set_xticks(x, [t[0] for t in is_], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("IS log-weights/s relative to PyTorch")
    ax.set_title("Importance-sampled log-likelihood")
    ax.legend(fontsize=8)
    m = results["machine"]
    from matplotlib.ticker import FuncFormatter, NullFormatter

    for ax in axes:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([0.25, 0.5, 1, 1.5, 2, 3, 5, 10])
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.8), max(hi, 2.5))
        for bar in ax.patches:
            h = bar.get_height()
            if np.isfinite(h):
                ax.annotate(f"{h:.2f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=7)
    fig.suptitle(f"dlvm_jax vs PyTorch on {m['cpu']} ({m['cores']} cores), {m['date']}; load average at start "
                 f"{m['load_average_start'][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results" / "latest.json"
    results = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(results))
    bar_chart(results, path.with_suffix(".png"))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
