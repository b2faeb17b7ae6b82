"""One train-step setting of ``python -m benchmarks``, JAX against PyTorch, in paired rounds of fresh processes.

    python -m benchmarks.pairs --model mlp_vae [--samples 1] [--rounds 8] [--against torch_eager]
                               [--microbatch 0] [--data-dir DIR] [--out FILE]

A full benchmark run measures each framework once, minutes apart, in its own process; on a shared host the
ratio of two such measurements moves with whatever else the host runs meanwhile (PyTorch eager's MLP VAE step at
M=1 ran at 136-277 steps/s over the eleventh session's and earlier runs, JAX's at 279-412). Here the two workers
of ``benchmarks.worker`` (the same code, data, batch, Adam and timed repeats as the full run) run back to back, in
ABBA order (JAX first in odd rounds, PyTorch first in even ones), ``--rounds`` times. Each round gives one ratio
of two measurements taken seconds apart; the spread of those ratios, and the ratio of the medians, show what a
single full run can and cannot tell. ``--microbatch`` applies to both frameworks alike (the conv VAE's steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.__main__ import BATCH, TARGETS, parse_args, prepare_data, run_worker, train_task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp_vae", choices=sorted(BATCH))
    p.add_argument("--samples", type=int, default=1, help="Monte Carlo samples M (1: ELBO; more: IWAE)")
    p.add_argument("--microbatch", type=int, default=0, help="microbatch size for both (0: the whole batch)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per process (as the full run: 5)")
    p.add_argument("--against", default="torch_eager", choices=("torch_eager", "torch_compile"))
    p.add_argument("--data-dir", default=os.environ.get("DLVM_DATA_DIR"),
                   help="folder with mnist/ (default $DLVM_DATA_DIR); without it, random binary images")
    p.add_argument("--out", help="JSON file for the results (default: print only)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.samples < 1 or args.microbatch < 0:
        p.error("--rounds, --repeats and --samples must be at least 1 and --microbatch at least 0")
    batch = BATCH[args.model]
    if args.microbatch and not (args.microbatch < batch and batch % args.microbatch == 0):
        p.error(f"--microbatch must be 0 or divide the batch size {batch} into several microbatches, "
                f"got {args.microbatch}")
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow
    from benchmarks.common import write_result

    # the full run's defaults (no malloc changes, no OMP policy, CPU or GPU as found), with this run's repeats
    worker_args = parse_args(["--repeats", str(args.repeats)])
    frameworks = ("jax", args.against)
    runs: dict[str, list[dict]] = {fw: [] for fw in frameworks}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), args.data_dir, BATCH[args.model])
        for r in range(args.rounds):
            for fw in (frameworks if r % 2 == 0 else frameworks[::-1]):
                task = train_task(fw, args.model, args.samples, files["spiral" if args.model == "gmvae" else "images"],
                                  worker_args, microbatch=args.microbatch)
                out = run_worker(task, worker_args)
                if "error" in out:
                    print(f"{fw}: {out['error']}", file=sys.stderr)
                    return 1
                kept = ("repeat_steps_per_s", "wall_s", "dot_library", "dot_tuning_ms", "compile_s",
                        "minor_faults_per_call")
                runs[fw].append({"round": r + 1, "steps_per_s": out["steps_per_s"],
                                 **{k: out[k] for k in kept if k in out}})
            ratios.append(runs["jax"][-1]["steps_per_s"] / runs[args.against][-1]["steps_per_s"])
            print(f"round {r + 1}: JAX {runs['jax'][-1]['steps_per_s']:8.2f}, {args.against} "
                  f"{runs[args.against][-1]['steps_per_s']:8.2f} steps/s: {ratios[-1]:.2f}x", flush=True)
    medians = {fw: statistics.median(row["steps_per_s"] for row in rows) for fw, rows in runs.items()}
    ratio_of_medians = medians["jax"] / medians[args.against]
    print(f"median steps/s: JAX {medians['jax']:.2f}, {args.against} {medians[args.against]:.2f} "
          f"({ratio_of_medians:.2f}x); round ratios {min(ratios):.2f}-{max(ratios):.2f}, median "
          f"{statistics.median(ratios):.2f}; {sum(x >= TARGETS['train_ratio_vs_eager'] for x in ratios)} of "
          f"{len(ratios)} at or above {TARGETS['train_ratio_vs_eager']}")
    result = {"command": "python -m benchmarks.pairs " + " ".join(sys.argv[1:] if argv is None else argv),
              "setting": {"model": args.model, "num_samples": args.samples, "microbatch": args.microbatch,
                          "batch_size": BATCH[args.model], "repeats": args.repeats, "against": args.against},
              "images": files["spiral_source" if args.model == "gmvae" else "image_source"],
              "runs": runs, "round_ratios": ratios, "median_steps_per_s": medians,
              "ratio_of_medians": ratio_of_medians, "median_round_ratio": statistics.median(ratios),
              "target": TARGETS["train_ratio_vs_eager"],
              "rounds_meeting_target": sum(x >= TARGETS["train_ratio_vs_eager"] for x in ratios)}
    if args.out:
        write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
