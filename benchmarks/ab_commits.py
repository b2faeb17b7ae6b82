"""A model's JAX train step in this working tree against an earlier commit, A/B in fresh processes.

    python -m benchmarks.ab_commits --baseline REV [--model conv_vae] [--samples 1] [--microbatch 10]
                                    [--rounds 4] [--out FILE]

Checks the library at ``REV`` out into a temporary git worktree and, round by round, runs the train step of
``python -m benchmarks`` (``benchmarks.worker.jax_train``: Adam, the benchmark's batch and data, median of timed
repeats after warm-up) once with that library and once with this tree's, each in a fresh process, so that a slow
spell of the host falls on both. The measuring code is this tree's either way; only ``dlvm_jax`` differs. Records
each process's steps/s (median of its repeats, and every repeat) and the medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.__main__ import BATCH, ROOT, prepare_data


def child(tree: str, task: dict) -> dict:
    """One process: the benchmark's JAX train step with ``dlvm_jax`` imported from ``tree``."""
    from benchmarks import worker  # this tree's measuring code, imported before the library's path changes

    sys.path.insert(0, tree)
    import dlvm_jax

    where = Path(dlvm_jax.__file__).resolve().parent.parent
    if where != Path(tree).resolve():
        raise RuntimeError(f"dlvm_jax came from {where}, not from {tree}")
    return worker.jax_train(task)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_commits", description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="the commit (any git revision) to measure against")
    p.add_argument("--model", default="conv_vae", choices=sorted(BATCH))
    p.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M (1: ELBO; more: IWAE)")
    p.add_argument("--microbatch", type=int, default=0, help="microbatch size (0: the whole batch at once)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per process")
    p.add_argument("--data-dir", default=os.environ.get("DLVM_DATA_DIR"),
                   help="folder with mnist/ (default $DLVM_DATA_DIR); without it, random binary images")
    p.add_argument("--out", help="JSON file for the results (default: print only)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return 0
    if not args.baseline:
        p.error("--baseline REV is required")
    if args.rounds < 1 or args.repeats < 1 or args.microbatch < 0:
        p.error("--rounds and --repeats must be at least 1 and --microbatch at least 0")
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow
    from benchmarks.common import write_result

    commit = subprocess.run(["git", "rev-parse", "--verify", f"{args.baseline}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True)
    if commit.returncode:
        p.error(f"no commit {args.baseline!r} in this repository")
    baseline = commit.stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "dlvm_jax"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip())
    runs: dict[str, list[dict]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), args.data_dir, BATCH[args.model])
        task = {"model": args.model, "num_samples": args.samples, "microbatch": args.microbatch,
                "batch_size": BATCH[args.model], "data": files["spiral" if args.model == "gmvae" else "images"],
                "repeats": args.repeats, "target_s": 0.5, "warmup_s": 1.5}
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), baseline], cwd=ROOT, check=True)
        try:
            for r in range(args.rounds):
                for name, src in (("baseline", tree), ("this tree", ROOT)):
                    out = subprocess.run([sys.executable, "-m", "benchmarks.ab_commits", "--child", str(src),
                                          json.dumps(task)], cwd=ROOT, capture_output=True, text=True)
                    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                    if out.returncode or not lines:
                        print(out.stderr[-3000:], file=sys.stderr)
                        return 1
                    res = json.loads(lines[-1][len("RESULT "):])
                    runs[name].append({"round": r + 1, "steps_per_s": res["steps_per_s"],
                                       "repeat_steps_per_s": res["repeat_steps_per_s"]})
                    print(f"round {r + 1}  {name:<9}  {res['steps_per_s']:8.2f} steps/s  "
                          f"({1e3 / res['steps_per_s']:.1f} ms a step)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    medians = {name: statistics.median(r["steps_per_s"] for r in rows) for name, rows in runs.items()}
    ratio = medians["this tree"] / medians["baseline"]
    print(f"median steps/s: baseline {medians['baseline']:.2f}, this tree {medians['this tree']:.2f} "
          f"({ratio:.3f}x)")
    result = {"baseline": baseline, "this_tree": head + (" with uncommitted changes" if dirty else ""),
              "task": {k: v for k, v in task.items() if k != "data"},
              "images": files["spiral_source" if args.model == "gmvae" else "image_source"],
              "runs": runs, "median_steps_per_s": medians, "ratio": ratio}
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
