"""Train steps with glibc's default malloc and with ``dlvm_jax.runtime.keep_freed_memory``, JAX and PyTorch eager;
for JAX also without the per-heap limit of its temporaries (``dlvm_jax.runtime.TEMP_HEAP_BYTES = 0``).

    python -m benchmarks.profile_malloc [--models conv_vae,mlp_vae,gmvae] [--out benchmarks/results/profile_malloc.json]

XLA's CPU runtime allocates a compiled function's temporaries at every call, and PyTorch eager its tensors at
every operation; with glibc's defaults a large block is mapped fresh (``mmap``) and unmapped when freed, so every
step page-faults it in again and the kernel zeroes it. Each row runs one train step of ``python -m benchmarks`` in
fresh worker processes, with glibc's defaults and with ``keep_freed_memory`` (what ``python -m benchmarks
--keep-freed-memory`` applies to both frameworks), and records steps/s and the minor page faults per step
(``ru_minflt``) over the timed repeats. JAX's train step (``dlvm_jax.train.make_train_step``) splits its
temporaries into heaps of ``TEMP_HEAP_BYTES`` (:func:`dlvm_jax.runtime.tuned_jit`), which glibc's
defaults recycle; the ``one_block`` columns switch that off, leaving XLA's single block of temporaries.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "profile_malloc.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_malloc", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="conv_vae,mlp_vae,gmvae")
    p.add_argument("--samples", default="1,10", help="Monte Carlo samples M, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow

    from benchmarks.__main__ import BATCH, parse_args, prepare_data, run_worker
    from benchmarks.common import write_result

    worker_args = parse_args([])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), worker_args.data_dir, 200)
        for model in args.models.split(","):
            for m in (int(s) for s in args.samples.split(",")):
                for fw in ("jax", "torch_eager"):
                    row = {"model": model, "num_samples": m, "framework": fw}
                    configs = [("default", False, {}), ("kept", True, {})]
                    if fw == "jax":
                        configs.insert(0, ("one_block", False, {"temp_heap_bytes": 0}))
                    for name, keep, extra in configs:
                        out = run_worker({"kind": "train", "framework": fw, "model": model, "num_samples": m,
                                          "batch_size": BATCH[model], "repeats": args.repeats, "target_s": 0.5,
                                          "warmup_s": 1.0, "keep_freed_memory": keep, **extra,
                                          "data": files["spiral" if model == "gmvae" else "images"]}, worker_args)
                        row[f"{name}_steps_per_s"] = out.get("steps_per_s")
                        row[f"{name}_minor_faults_per_step"] = out.get("minor_faults_per_call")
                        row[f"{name}_peak_rss_mb"] = out.get("peak_rss_mb")
                        if "error" in out:
                            row[f"{name}_error"] = out["error"]
                    speedup = (row["kept_steps_per_s"] / row["default_steps_per_s"]
                               if row["kept_steps_per_s"] and row["default_steps_per_s"] else None)
                    row["speedup"] = round(speedup, 3) if speedup else None
                    if fw == "jax":
                        print(f"{model} M={m} {fw:<12} one block {row['one_block_steps_per_s'] or 0:8.2f} steps/s "
                              f"({row['one_block_minor_faults_per_step'] or 0:8.0f} faults/step)", flush=True)
                    print(f"{model} M={m} {fw:<12} default {row['default_steps_per_s'] or 0:8.2f} steps/s "
                          f"({row['default_minor_faults_per_step'] or 0:8.0f} faults/step)   kept "
                          f"{row['kept_steps_per_s'] or 0:8.2f} steps/s ({row['kept_minor_faults_per_step'] or 0:6.0f}"
                          f" faults/step)   x{row['speedup'] or 0:.2f}", flush=True)
                    rows.append(row)
    write_result(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
