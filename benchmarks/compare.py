"""Each framework across several runs of ``python -m benchmarks``: the fastest of each per setting, and the median.

    python -m benchmarks.compare default=benchmarks/results/latest.json kept=benchmarks/results/kept/latest.json \\
        [--out benchmarks/results/best_of.json]

Meant for runs that differ in a setting that helps one framework and hurts the other, such as
``--keep-freed-memory`` (glibc's malloc keeping freed memory: PyTorch eager gains up to 2.6x from it, JAX's small
models lose up to a third) or ``--microbatch`` (the conv VAE's gradient accumulated over microbatches): per model
and setting, JAX's fastest result is set against PyTorch eager's and torch.compile's fastest, each labelled with
the run it came from. For repeated runs of one setting on a shared, noisy machine, the median over the runs of
each framework's result is the steadier summary, and the ratio of those medians is given too. Writes JSON and
markdown tables next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.report import LABELS, _f, _num

OUT = Path(__file__).resolve().parent / "results" / "best_of.json"
TRAIN = {"jax": "jax_steps_per_s", "torch_eager": "torch_eager_steps_per_s",
         "torch_compile": "torch_compile_steps_per_s"}
IS = {"jax": "jax_logw_per_s", "torch": "torch_logw_per_s"}


def _values(runs: list[tuple[str, dict[str, Any]]], model: str, setting: str, key: str) -> list[tuple[float, str]]:
    """``key``'s value in each run that measured it for this model and setting, with the run's name."""
    return [(r["models"][model][setting][key], name) for name, r in runs
            if setting in r["models"].get(model, {}) and r["models"][model][setting].get(key)]


def best(runs: list[tuple[str, dict[str, Any]]], model: str, setting: str, key: str) -> tuple[float | None, str]:
    """The largest ``key`` over the runs for this model and setting, and the name of the run that gave it."""
    found = _values(runs, model, setting, key)
    return max(found) if found else (None, "-")


def median(runs: list[tuple[str, dict[str, Any]]], model: str, setting: str, key: str) -> tuple[float | None, int]:
    """The median of ``key`` over the runs that measured it for this model and setting, and how many did."""
    found = [v for v, _ in _values(runs, model, setting, key)]
    return (statistics.median(found) if found else None), len(found)


def _ratios(row: dict[str, Any], keys: dict[str, str], suffix: str = "") -> None:
    for fw in keys:
        if fw != "jax":
            a, b = row[f"jax{suffix}"], row[f"{fw}{suffix}"]
            row[f"ratio_vs_{fw}{suffix}"] = round(a / b, 3) if a and b else None


def compare(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    for model, settings in runs[0][1]["models"].items():
        for setting in settings:
            keys = TRAIN if setting.startswith("train") else IS
            row: dict[str, Any] = {"model": model, "setting": setting}
            for fw, key in keys.items():
                row[fw], row[f"{fw}_run"] = best(runs, model, setting, key)
                row[f"{fw}_median"], row[f"{fw}_runs"] = median(runs, model, setting, key)
            _ratios(row, keys)
            _ratios(row, keys, "_median")
            rows.append(row)
    return {"runs": [{"name": name, "command": r["command"], "malloc": r["machine"].get("malloc", "defaults"),
                      "microbatch": r["machine"].get("microbatch", "none"), "date": r["machine"]["date"]}
                     for name, r in runs], "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["Each framework's fastest result over the runs " + "; ".join(
        f"`{r['name']}` (`{r['command'].strip()}`, malloc: {r['malloc']}, microbatches: {r.get('microbatch', 'none')})"
        for r in result["runs"]) + ".", "",
        "| model | setting | JAX | PyTorch eager | torch.compile | JAX / eager | JAX / compile |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        torch = "torch_eager" if "torch_eager" in row else "torch"

        def cell(fw: str) -> str:
            return f"{_num(row[fw])} ({row[f'{fw}_run']})" if fw in row and row[fw] else "-"

        lines.append(f"| {LABELS[row['model']]} | {row['setting']} | {cell('jax')} | {cell(torch)} | "
                     f"{cell('torch_compile')} | {_f(row.get(f'ratio_vs_{torch}'), '{:.2f}')} | "
                     f"{_f(row.get('ratio_vs_torch_compile'), '{:.2f}')} |")
    lines += ["", "Each framework's median over the runs (how many runs measured it), and the ratios of the medians:",
              "", "| model | setting | JAX | PyTorch eager | torch.compile | JAX / eager | JAX / compile |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        torch = "torch_eager" if "torch_eager" in row else "torch"

        def med(fw: str) -> str:
            return f"{_num(row[f'{fw}_median'])} ({row[f'{fw}_runs']})" if row.get(f"{fw}_median") else "-"

        lines.append(f"| {LABELS[row['model']]} | {row['setting']} | {med('jax')} | {med(torch)} | "
                     f"{med('torch_compile')} | {_f(row.get(f'ratio_vs_{torch}_median'), '{:.2f}')} | "
                     f"{_f(row.get('ratio_vs_torch_compile_median'), '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", metavar="[NAME=]FILE",
                   help="latest.json files of python -m benchmarks, each optionally named (default: its folder)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    runs = []
    for arg in args.results:
        name, _, path = arg.rpartition("=")
        runs.append((name or Path(path).parent.name, json.loads(Path(path).read_text())))
    result = compare(runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out}, {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
