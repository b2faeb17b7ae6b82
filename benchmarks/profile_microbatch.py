"""Train steps with the gradient accumulated over microbatches, JAX and PyTorch eager alike.

    python -m benchmarks.profile_microbatch [--models conv_vae] [--samples 1,10] [--sizes 0,5,10,20]
                                            [--keep-freed-memory] [--out benchmarks/results/profile_microbatch.json]

Each row runs one train step of ``python -m benchmarks`` (Adam, batch 100 for the VAEs) in fresh worker processes,
once per microbatch size (0: the whole batch at once): JAX's ``make_train_step`` on
``dlvm_jax.objectives.microbatched(loss_fn, size)`` (one ``lax.scan`` of ``value_and_grad`` over the microbatches
inside the jitted step) and PyTorch eager with the same accumulation (one backward pass per microbatch of the loss
divided by their number, then one optimizer step). It records steps/s, minor page faults per step (``ru_minflt``)
and peak resident memory: what ``python -m benchmarks --microbatch N`` does to the conv VAE's step, for each size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "profile_microbatch.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_microbatch", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="conv_vae")
    p.add_argument("--samples", default="1,10", help="Monte Carlo samples M, comma-separated")
    p.add_argument("--sizes", default="0,5,10,20", help="microbatch sizes, comma-separated (0: none)")
    p.add_argument("--frameworks", default="jax,torch_eager")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc's malloc keeping freed memory in every worker (as python -m benchmarks "
                        "--keep-freed-memory)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

    from benchmarks.__main__ import BATCH, parse_args, prepare_data, run_worker
    from benchmarks.common import write_result

    worker_args = parse_args(["--keep-freed-memory"] if args.keep_freed_memory else [])
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), worker_args.data_dir, 200)
        for model in args.models.split(","):
            for m in (int(s) for s in args.samples.split(",")):
                for fw in args.frameworks.split(","):
                    for size in sizes:
                        out = run_worker({"kind": "train", "framework": fw, "model": model, "num_samples": m,
                                          "batch_size": BATCH[model], "repeats": args.repeats, "target_s": 0.5,
                                          "warmup_s": 1.0, "microbatch": size,
                                          "data": files["spiral" if model == "gmvae" else "images"]},
                                         worker_args)
                        row = {"model": model, "num_samples": m, "framework": fw, "microbatch": size,
                               "steps_per_s": out.get("steps_per_s"),
                               "minor_faults_per_step": out.get("minor_faults_per_call"),
                               "peak_rss_mb": out.get("peak_rss_mb")}
                        if "error" in out:
                            row["error"] = out["error"]
                        rows.append(row)
                        shown = "ERROR " + out["error"] if "error" in out else (
                            f"{row['steps_per_s']:8.2f} steps/s ({row['minor_faults_per_step']:8.0f} faults/step, "
                            f"peak {row['peak_rss_mb']:.0f} MB)")
                        print(f"{model} M={m:<2} {fw:<12} microbatch {size or 'none':>4}  {shown}", flush=True)
    write_result(args.out, {"keep_freed_memory": args.keep_freed_memory, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
