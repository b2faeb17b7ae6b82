"""The conv VAE's train step with the encoder's 64 -> 64 layers in nine-tap or in row patches, A/B in fresh processes.

    python -m benchmarks.profile_patch_forms [--rounds 2] [--microbatch 0,10] [--out FILE]

``conv3x3_by_patches`` takes row patches for those layers by default (``form="auto"``); the "nine-tap" rows
force ``form="patches"`` everywhere. Each setting (form x microbatch size, 0: the whole batch) runs the train step
of ``python -m benchmarks`` (Adam, batch 100 of its images, ELBO with one sample) in a
fresh process, the settings interleaved round by round, so that a slow spell of the host hits each alike. Every
process records the median and the fastest of 5 timed repeats of 8 steps (milliseconds a step) and its minor page
faults a step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "profile_patch_forms.json"
ROOT = Path(__file__).resolve().parent.parent


def child(form: str, microbatch: int, data: str) -> dict:
    """One process: the conv VAE train step with the given patch form; returns ms a step and faults a step."""
    import resource
    import statistics
    import time

    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dlvm_jax import networks

    if form == "nine-tap":
        conv = networks.conv3x3_by_patches

        def nine_taps(x, kernel, stride=1, bias=None, activation=None, form="auto"):
            return conv(x, kernel, stride, bias, activation, "patches" if form == "auto" else form)

        networks.conv3x3_by_patches = nine_taps  # what PatchConv calls
    from dlvm_jax.models.vae import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss, microbatched
    from dlvm_jax.train import init_state, make_train_step

    model = VAE(VAEConfig(data_shape=(28, 28, 1), latent_dim=2, network="conv"))
    loss_fn = make_loss(model, objective="elbo", num_samples=1)
    if microbatch:
        loss_fn = microbatched(loss_fn, microbatch)
    batch = jnp.asarray(np.load(data, allow_pickle=False)[:100].reshape(-1, 28, 28, 1))
    opt = optax.adam(1e-3)
    state = init_state(jax.jit(model.init)(jax.random.key(0)), opt, jax.random.key(1))
    step = make_train_step(loss_fn, opt)
    for _ in range(6):  # compile and warm up
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times, steps = [], 8
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t) / steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (5 * steps)
    return {"ms_median": round(1000 * statistics.median(times), 2), "ms_min": round(1000 * min(times), 2),
            "minor_faults_per_step": round(faults)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_patch_forms",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--microbatch", default="0,10", help="microbatch sizes, comma-separated (0: the whole batch)")
    p.add_argument("--data-dir", default=os.environ.get("DLVM_DATA_DIR"),
                   help="folder with mnist/ (default $DLVM_DATA_DIR); without it, random binary images")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        form, microbatch, data = json.loads(args.child)
        print(json.dumps(child(form, microbatch, data)))
        return 0
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]

    import tempfile

    from benchmarks.__main__ import prepare_data
    from benchmarks.common import write_result

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), args.data_dir, 100)
        data = files["images"]
        for r in range(args.rounds):
            for microbatch in (int(m) for m in args.microbatch.split(",")):
                for form in ("nine-tap", "rows"):
                    spec = json.dumps([form, microbatch, data])
                    out = subprocess.run([sys.executable, "-m", "benchmarks.profile_patch_forms", "--child", spec],
                                         cwd=ROOT, capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-3000:], file=sys.stderr)
                        return 1
                    row = {"round": r + 1, "form": form, "microbatch": microbatch,
                           **json.loads(out.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(f"round {r + 1}  microbatch {microbatch or 'none':>4}  {form:<8}  "
                          f"{row['ms_median']:7.1f} ms a step (fastest {row['ms_min']:.1f}), "
                          f"{row['minor_faults_per_step']} faults a step", flush=True)
    write_result(args.out, {"images": files["image_source"], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
