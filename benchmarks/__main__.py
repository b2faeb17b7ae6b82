"""dlvm_jax against PyTorch: train-step and importance-sampling throughput, memory, compile time, FLOP/s.

    python -m benchmarks [--data-dir DIR] [--out benchmarks/results] [--quick] [--models mlp_vae,conv_vae,gmvae]

Models (benchmarks/torch_models.py holds the PyTorch side; tests/test_torch_parity.py proves both compute the same
thing): the Bernoulli MLP VAE 784-200-200-50 (tanh), the convolutional VAE of the binarized-MNIST experiment (2-D
latent) and the GMVAE of the spiral experiment. Measured, each in a fresh process (benchmarks/worker.py) on the
same cores with the same thread count (with ``--interleave``, the frameworks' train-step workers for one setting
are kept alive side by side and their timed repeats alternated, so that a slow spell of a shared machine falls on
all of them):

* train-step throughput (steps/s, median of 5 repeats after warm-up, compilation excluded) of dlvm_jax's jitted,
  donated ``make_train_step`` against PyTorch eager and ``torch.compile`` (Adam 1e-3 on both sides; batch 100 for
  the VAEs and 200 for the GMVAE; M = 1 and 10 Monte Carlo samples: the VAEs' ELBO with M = 1, IWAE with M = 10);
  the conv VAE's steps in every framework alike with the whole batch at once and with the gradient accumulated over
  microbatches of 5 and of 10 examples (``--microbatch``), each framework's fastest being its result (its
  activations outgrow the caches and the memory that glibc's malloc recycles; every size is in the JSON);
* importance-sampled log-likelihood throughput (log-weights/s) with K = 5000 on 1,000 test images (10 for the
  conv VAE, whose decoder costs 7.4 MFLOP a sample): dlvm_jax's ``make_batch_estimator`` against PyTorch under
  ``inference_mode``, both in batches of images and chunks of samples;
* the peak resident memory of each process, JAX's compile time, and the achieved FLOP/s (FLOPs counted from the
  layer shapes, benchmarks/flops.py) as a fraction of a float32 matmul peak measured in the same run (the better
  of JAX's and PyTorch's 2048x2048 matmul); JAX's IS FLOP/s also as a fraction of its matmul peak sampled before
  and after each of its IS batches (the MLP VAE's 40% target is checked against that one: the shared host's speed
  drifts by a fifth within a run, and the IS worker runs minutes after the run's peak).

Data: thresholded MNIST test images from DIR/mnist when ``--data-dir`` or ``$DLVM_DATA_DIR`` has them, otherwise
random binary images (the timings do not depend on the pixel values); the spiral points for the GMVAE.
Writes ``latest.json``, ``latest.md`` and ``latest.png`` to ``--out`` and prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import flops
from benchmarks.common import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("mlp_vae", "conv_vae", "gmvae")
LABELS = {"mlp_vae": "MLP VAE 784-200-200-50", "conv_vae": "conv VAE (2-D latent)", "gmvae": "GMVAE spiral (K=5)"}
BATCH = {"mlp_vae": 100, "conv_vae": 100, "gmvae": 200}
SAMPLES = (1, 10)
TRAIN_FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
#: Models whose train steps ``--microbatch`` applies to (the GMVAE's loss is not a mean over examples; the MLP VAE's
#: activations are small).
MICROBATCHED = ("conv_vae",)
#: The microbatch sizes at which those train steps are measured by default, in every framework alike (0: the whole
#: batch at once); each framework's fastest is its result (``python -m benchmarks.profile_microbatch`` sweeps more).
MICROBATCH_SIZES = (0, 5, 10)
#: Models that ``dlvm_jax.train.fit`` trains with one jitted ``lax.scan`` per epoch (the command line steps the conv
#: VAE one batch at a time): their JAX workers also time ``make_epoch`` (``jax_epoch_steps_per_s``; not a target).
SCANNED = ("mlp_vae", "gmvae")
TARGETS = {"train_ratio_vs_eager": 1.5, "is_ratio_vs_torch": 2.0, "mlp_is_fraction_of_matmul_peak": 0.4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("DLVM_DATA_DIR"),
                   help="folder with mnist/ (default $DLVM_DATA_DIR); without it, random binary images")
    p.add_argument("--out", default=str(RESULTS), help="output folder (default benchmarks/results)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 short repeats, K=200 on 20 images; not for reporting")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per train-step measurement (5)")
    p.add_argument("--repeat-seconds", type=float, default=0.5, help="length of one timed repeat (0.5 s)")
    p.add_argument("--is-samples", type=int, default=5000, help="K importance samples (5000)")
    p.add_argument("--is-images", type=int, default=1000, help="test images for IS (1000; the conv VAE uses 1/100)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--torch-omp-passive", action="store_true",
                   help="run PyTorch with OMP_WAIT_POLICY=PASSIVE: on a machine shared with other jobs, OpenMP's "
                        "default spin-waiting can slow PyTorch down by orders of magnitude")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="run every worker, JAX and PyTorch alike, with glibc's malloc set to keep freed memory "
                        "(dlvm_jax.runtime.keep_freed_memory) instead of its defaults, under which large "
                        "temporaries are mapped, unmapped and page-faulted in afresh at every step")
    p.add_argument("--microbatch", default=",".join(map(str, MICROBATCH_SIZES)), metavar="SIZES",
                   help="the conv VAE's train steps are measured with the gradient accumulated over microbatches of "
                        "each of these sizes, comma-separated, in every framework alike (JAX: "
                        "dlvm_jax.objectives.microbatched; PyTorch: one backward pass per microbatch; 0: the whole "
                        "batch at once), and each framework's fastest is its result (default "
                        + ",".join(map(str, MICROBATCH_SIZES)) + "; 0 for the whole batch only)")
    p.add_argument("--interleave", action="store_true",
                   help="keep the frameworks' train-step workers for a setting alive side by side and alternate "
                        "their timed repeats, so that a slow spell of a shared machine falls on all of them "
                        "(default: one worker after the other)")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even where a GPU is present")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement process")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    args.microbatch = parse_microbatch_sizes(p, args.microbatch, BATCH["conv_vae"])
    if args.quick:
        args.repeats, args.repeat_seconds, args.is_samples, args.is_images = 2, 0.1, 200, 20
    return args


def parse_microbatch_sizes(p: argparse.ArgumentParser, text: str, batch: int) -> tuple[int, ...]:
    """``--microbatch``: distinct sizes in the given order, each 0 (the whole batch) or a divisor of ``batch`` below
    it; otherwise a one-line usage error."""
    try:
        sizes = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        p.error(f"--microbatch takes comma-separated integers, got {text!r}")
    bad = [n for n in sizes if n != 0 and not (0 < n < batch and batch % n == 0)]
    if not sizes or bad:
        p.error(f"--microbatch sizes must be 0 (the whole batch) or divide the batch size {batch} into several "
                f"microbatches; got {text!r}")
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# Data and workers
# ----------------------------------------------------------------------------------------------------------------


def prepare_data(folder: Path, data_dir: str | None, num_images: int) -> dict[str, Any]:
    """Write the images (N, 784) and spiral points (5000, 2) as .npy files (never pickle) for the workers."""
    from dlvm_jax import data

    source = "random binary images (p=0.13)"
    images = None
    if data_dir:
        try:
            ds = data.mnist(data_dir)
            images = np.asarray(data.threshold(ds.x_test[:num_images]), np.float32)
            source = "MNIST test images thresholded at 0.5"
        except (OSError, ValueError) as err:
            print(f"note: no MNIST under {data_dir} ({str(err).splitlines()[0]}); using random binary images")
    if images is None:
        images = (np.random.default_rng(0).random((num_images, 784)) < 0.13).astype(np.float32)
    spiral = data.make_spiral(5000, seed=0)[0].astype(np.float32)
    np.save(folder / "images.npy", images, allow_pickle=False)
    np.save(folder / "spiral.npy", spiral, allow_pickle=False)
    return {"images": str(folder / "images.npy"), "spiral": str(folder / "spiral.npy"), "image_source": source,
            "spiral_source": "dlvm_jax.data.make_spiral(5000, seed=0)"}


def shown_command(argv: list[str]) -> str:
    """The command line as recorded in the results, free of this machine's paths: absolute paths inside the
    repository made relative to it, others (an output or data folder elsewhere) shown as DIR."""
    def show(arg: str) -> str:
        path = Path(arg)
        if path.is_absolute():
            return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else "DIR"
        if "=" in arg and arg.startswith("--"):
            flag, _, value = arg.partition("=")
            return f"{flag}={show(value)}"
        return arg

    return " ".join(["python -m benchmarks", *map(show, argv)])


def _worker_command(task: dict[str, Any], args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    task = {"keep_freed_memory": args.keep_freed_memory, **task}
    env = dict(os.environ)
    if args.torch_omp_passive and task["framework"].startswith("torch"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if args.cpu:
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return [sys.executable, "-m", "benchmarks.worker", json.dumps(task)], env


def _result(stdout: str, returncode: int | None, stderr: str) -> dict[str, Any]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited with status {returncode}: {tail}"[:500]}


def train_task(framework: str, model: str, num_samples: int, data: str, args: argparse.Namespace, *,
               microbatch: int = 0, epoch: bool = False) -> dict[str, Any]:
    """A train-step worker's task: ``model``'s batch, ``args.repeats`` timed repeats of ``args.repeat_seconds``
    after twice that of warm-up; ``epoch`` also times JAX's scanned epoch."""
    return {"kind": "train", "framework": framework, "model": model, "num_samples": num_samples,
            "batch_size": BATCH[model], "data": data, "repeats": args.repeats, "target_s": args.repeat_seconds,
            "warmup_s": 2 * args.repeat_seconds, "microbatch": microbatch, "epoch": epoch}


def run_worker(task: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    command, env = _worker_command(task, args)
    load = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        out = _result(proc.stdout, proc.returncode, proc.stderr)
    except subprocess.TimeoutExpired:
        out = {"error": f"timed out after {args.timeout:.0f} s"}
    out["wall_s"] = round(time.perf_counter() - t, 1)
    out["load_average_1min_before"] = round(load, 2)
    return out


class _LiveWorker:
    """A worker process run with ``interleaved``: it sets up, then waits for its turn before each timed repeat."""

    def __init__(self, task: dict[str, Any], args: argparse.Namespace) -> None:
        command, env = _worker_command({**task, "interleaved": True}, args)
        self.load = os.getloadavg()[0]
        self.start = time.perf_counter()
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.stdout: list[str] = []
        self.alive = self.read_until("WAITING")  # set up, compiled and warmed up

    def read_until(self, marker: str) -> bool:
        """Read stdout up to a line ``marker``; False when the worker ended first (an error, or its result)."""
        for line in self.proc.stdout:
            self.stdout.append(line)
            if line.strip() == marker:
                return True
        return False

    def take_turn(self, first: bool) -> None:
        """One timed repeat: wait for the worker to be ready (not before the first), let it go, wait until done."""
        if self.alive and not first:
            self.alive = self.read_until("WAITING")
        if self.alive:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            self.alive = self.read_until("TIMED")

    def finish(self) -> dict[str, Any]:
        """Let the worker end (its stdin closed) and take its result."""
        self.proc.stdin.close()
        self.stdout.append(self.proc.stdout.read())  # to its end (the watchdog of run_interleaved kills a hung one)
        self.proc.wait()
        self.stderr.seek(0)
        out = _result("".join(self.stdout), self.proc.returncode, self.stderr.read())
        self.stderr.close()
        out["wall_s"] = round(time.perf_counter() - self.start, 1)
        out["load_average_1min_before"] = round(self.load, 2)
        return out


def run_interleaved(tasks: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run one worker per framework, set up one after the other (so that compile times do not overlap), then
    alternate their timed repeats, the first framework rotating from repeat to repeat: a slow spell of a shared
    machine, which lasts seconds, then falls on every framework's repeats alike instead of on one worker. Each
    worker reports the median of its repeats as before. A watchdog kills them all after ``--timeout`` seconds
    each."""
    workers: dict[str, _LiveWorker] = {}
    watchdog = threading.Timer(args.timeout * max(1, len(tasks)),
                               lambda: [w.proc.kill() for w in workers.values()])
    watchdog.start()
    try:
        for fw, task in tasks.items():
            workers[fw] = _LiveWorker(task, args)
        names = list(workers)
        for rep in range(args.repeats):
            shift = rep % len(names)
            for fw in names[shift:] + names[:shift]:
                workers[fw].take_turn(first=rep == 0)
        return {fw: w.finish() for fw, w in workers.items()}
    finally:
        watchdog.cancel()
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()


def show(label: str, out: dict[str, Any], key: str, unit: str) -> None:
    if "error" in out:
        print(f"  {label:<44} ERROR {out['error']}", flush=True)
    else:
        print(f"  {label:<44} {out[key]:12.1f} {unit}   ({out['wall_s']:.0f} s, load {out['load_average_1min_before']})",
              flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Assembling results
# ----------------------------------------------------------------------------------------------------------------


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def _get(out: dict[str, Any], key: str) -> float | None:
    return None if "error" in out else out.get(key)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fastest(by_size: dict[int, dict[str, dict]]) -> tuple[dict[str, dict], dict[str, int | None]]:
    """Each framework's measurement at its fastest microbatch size (an error where every size failed), and that
    size (None where every size failed)."""
    outs, sizes = {}, {}
    for fw in TRAIN_FRAMEWORKS:
        ok = [(_get(o[fw], "steps_per_s"), size) for size, o in by_size.items() if _get(o[fw], "steps_per_s")]
        sizes[fw] = max(ok)[1] if ok else None
        outs[fw] = by_size[sizes[fw] if ok else next(iter(by_size))][fw]
    return outs, sizes


def train_entry(model: str, m: int, by_size: dict[int, dict[str, dict]], peak: float) -> dict[str, Any]:
    """One train setting: per framework, its fastest over the microbatch sizes measured (``by_size``: size ->
    framework -> worker output; 0 is the whole batch)."""
    from benchmarks.worker import objective_for

    gflop = flops.train_step_flops(model, BATCH[model], m) / 1e9
    outs, best_size = fastest(by_size)
    jax_s, eager_s, comp_s = (_get(outs[f], "steps_per_s") for f in TRAIN_FRAMEWORKS)
    entry = {
        "objective": objective_for(model, m), "batch_size": BATCH[model], "num_samples": m,
        "jax_steps_per_s": _r(jax_s, 4), "torch_eager_steps_per_s": _r(eager_s, 4),
        "torch_compile_steps_per_s": _r(comp_s, 4),
        "ratio_vs_eager": _r(_ratio(jax_s, eager_s)), "ratio_vs_compile": _r(_ratio(jax_s, comp_s)),
        "jax_compile_s": _r(_get(outs["jax"], "compile_s")),
        "torch_compile_s": _r(_get(outs["torch_compile"], "compile_s")),
        "gflop_per_step": _r(gflop, 4),
        "fraction_of_matmul_peak": _r(jax_s * gflop * 1e9 / peak if jax_s else None),
        "torch_eager_fraction_of_matmul_peak": _r(eager_s * gflop * 1e9 / peak if eager_s else None),
        "torch_compile_fraction_of_matmul_peak": _r(comp_s * gflop * 1e9 / peak if comp_s else None),
        "peak_rss_mb": {f: _r(_get(outs[f], "peak_rss_mb"), 4) for f in TRAIN_FRAMEWORKS},
        "rss_increase_mb": {f: _r(_get(outs[f], "rss_increase_mb"), 4) for f in TRAIN_FRAMEWORKS},
        "minor_faults_per_step": {f: _r(_get(outs[f], "minor_faults_per_call"), 4) for f in TRAIN_FRAMEWORKS},
    }
    epoch_s = _get(outs["jax"], "epoch_steps_per_s")
    if epoch_s:  # how fit trains it: a scanned epoch (not a target)
        entry["jax_epoch_steps_per_s"] = _r(epoch_s, 4)
        entry["epoch_ratio_vs_eager"] = _r(_ratio(epoch_s, eager_s))
    entry["microbatch"] = best_size
    if len(by_size) > 1:
        entry["steps_per_s_by_microbatch"] = {
            str(size): {f: _r(_get(o[f], "steps_per_s"), 4) for f in TRAIN_FRAMEWORKS} for size, o in by_size.items()}
        if 0 in by_size:
            whole = [_get(by_size[0][f], "steps_per_s") for f in ("jax", "torch_eager")]
            entry["ratio_vs_eager_whole_batch"] = _r(_ratio(*whole))
    if "error" in outs["torch_compile"]:
        entry["torch_compile_error"] = outs["torch_compile"]["error"]
    errors = {f: outs[f]["error"] for f in ("jax", "torch_eager") if "error" in outs[f]}
    if errors:
        entry["errors"] = errors
    entry["raw"] = outs if len(by_size) == 1 else {str(size): o for size, o in by_size.items()}
    return entry


def is_entry(model: str, k: int, images: int, outs: dict[str, dict], peak: float, chunk: int,
             batch: int) -> dict[str, Any]:
    per_logw = flops.log_weight_flops(model, k)
    jax_r, torch_r = _get(outs["jax"], "logw_per_s"), _get(outs["torch"], "logw_per_s")
    adjacent = _get(outs["jax"], "adjacent_peak_gflops")  # JAX's matmul peak sampled around its IS batches
    entry = {
        "num_samples": k, "images": images, "batch_size": batch, "chunk_size": chunk,
        "jax_logw_per_s": _r(jax_r, 4), "torch_logw_per_s": _r(torch_r, 4), "ratio_vs_torch": _r(_ratio(jax_r, torch_r)),
        "mflop_per_logw": _r(per_logw / 1e6, 4),
        "fraction_of_matmul_peak": _r(jax_r * per_logw / peak if jax_r else None),
        "torch_fraction_of_matmul_peak": _r(torch_r * per_logw / peak if torch_r else None),
        "adjacent_matmul_peak_gflops": _r(adjacent, 4),
        "fraction_of_adjacent_matmul_peak": _r(jax_r * per_logw / (adjacent * 1e9) if jax_r and adjacent else None),
        "jax_compile_s": _r(_get(outs["jax"], "compile_s")),
        "log_px_mean": {"jax": _r(_get(outs["jax"], "log_px_mean"), 6), "torch": _r(_get(outs["torch"], "log_px_mean"), 6)},
        "peak_rss_mb": {f: _r(_get(outs[f], "peak_rss_mb"), 4) for f in ("jax", "torch")},
        "rss_increase_mb": {f: _r(_get(outs[f], "rss_increase_mb"), 4) for f in ("jax", "torch")},
    }
    errors = {f: o["error"] for f, o in outs.items() if "error" in o}
    if errors:
        entry["errors"] = errors
    entry["raw"] = outs
    return entry


def check_targets(models: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    for model, settings in models.items():
        for name, s in settings.items():
            if name.startswith("train"):
                v, target, what = s["ratio_vs_eager"], TARGETS["train_ratio_vs_eager"], "JAX / torch eager steps/s"
            else:
                v, target, what = s["ratio_vs_torch"], TARGETS["is_ratio_vs_torch"], "JAX / torch IS log-weights/s"
            out.append({"model": model, "setting": name, "what": what, "value": v, "target": target,
                        "met": v is not None and v >= target})
            if model == "mlp_vae" and name.startswith("is"):
                # Against the peak sampled between the IS batches where there is one (the same minutes), else the
                # run's.
                adjacent = s.get("fraction_of_adjacent_matmul_peak")
                v, target = (adjacent if adjacent is not None else s["fraction_of_matmul_peak"],
                             TARGETS["mlp_is_fraction_of_matmul_peak"])
                what = ("JAX IS FLOP/s / matmul peak sampled between its batches" if adjacent is not None
                        else "JAX IS FLOP/s / matmul peak")
                out.append({"model": model, "setting": name, "what": what, "value": v,
                            "target": target, "met": v is not None and v >= target})
    return out


def microbatch_description(sizes: tuple[int, ...]) -> str:
    if sizes == (0,):
        return "none"
    shown = " and ".join(", ".join(["the whole batch" if n == 0 else f"microbatches of {n}" for n in sizes]
                                   ).rsplit(", ", 1))
    if len(sizes) == 1:
        return (f"the conv VAE's train-step gradient accumulated over {shown} examples in every framework "
                "(--microbatch)")
    return (f"the conv VAE's train steps measured with {shown} in every framework alike, each framework's fastest "
            "taken (--microbatch)")


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "jax": version("jax"), "jaxlib": version("jaxlib"), "flax": version("flax"), "optax": version("optax"),
            "torch": version("torch"), "numpy": version("numpy"),
            "date": time.strftime("%Y-%m-%d"),
            "malloc": ("freed memory kept for reuse in every worker, JAX and PyTorch alike (--keep-freed-memory)"
                       if args.keep_freed_memory else "defaults"),
            "microbatch": microbatch_description(args.microbatch),
            "interleave": bool(args.interleave),
            "torch_omp_wait_policy": "PASSIVE" if args.torch_omp_passive else os.environ.get("OMP_WAIT_POLICY",
                                                                                             "default")}


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]  # see benchmarks.worker._no_tensorflow
    start = time.perf_counter()
    load_start = os.getloadavg()
    results: dict[str, Any] = {"command": shown_command(sys.argv[1:] if argv is None else argv),
                               "machine": machine(args), "quick": args.quick}
    results["machine"]["load_average_start"] = [round(x, 2) for x in load_start]
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores, load average "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare_data(Path(tmp), args.data_dir, max(args.is_images, max(BATCH.values())))
        results["data"] = {"images": files["image_source"], "spiral": files["spiral_source"]}

        def data_for(model: str) -> str:
            return files["spiral"] if model == "gmvae" else files["images"]

        print("float32 matmul peak (2048 x 2048 on a CPU, 8192 x 8192 on a GPU):", flush=True)
        peaks = {}
        for fw in ("jax", "torch"):
            peaks[fw] = run_worker({"kind": "peak", "framework": fw, "n": 2048, "repeats": 5, "target_s": 0.5}, args)
            show(fw, peaks[fw], "gflops", "GFLOP/s")
        peak = max((_get(o, "gflops") or 0.0) for o in peaks.values()) * 1e9
        if peak <= 0:
            print("error: no matmul peak could be measured", file=sys.stderr)
            return 1
        results["machine"]["device"] = _get(peaks["jax"], "device") or "unknown"
        results["machine"]["torch_device"] = _get(peaks["torch"], "device") or "unknown"
        results["matmul_peak"] = {"n": _get(peaks["jax"], "n") or 2048, "jax_gflops": _r(_get(peaks["jax"], "gflops"), 4),
                                  "torch_gflops": _r(_get(peaks["torch"], "gflops"), 4), "peak_gflops": _r(peak / 1e9, 4)}

        models: dict[str, dict[str, Any]] = {}
        print("train-step throughput:", flush=True)
        for model in args.models:
            models[model] = {}
            for m in SAMPLES:
                by_size: dict[int, dict[str, dict]] = {}
                for size in (args.microbatch if model in MICROBATCHED else (0,)):
                    tasks = {fw: train_task(fw, model, m, data_for(model), args, microbatch=size,
                                            epoch=fw == "jax" and model in SCANNED and not size)
                             for fw in TRAIN_FRAMEWORKS if not (fw == "torch_compile" and args.no_compile)}
                    if args.interleave:
                        outs = run_interleaved(tasks, args)
                    else:
                        outs = {fw: run_worker(task, args) for fw, task in tasks.items()}
                    outs.update({fw: {"error": "skipped (--no-compile)"} for fw in TRAIN_FRAMEWORKS if fw not in outs})
                    by_size[size] = outs
                    for fw in TRAIN_FRAMEWORKS:
                        shown = f" microbatch {size}" if size else ""
                        show(f"{model} M={m} {fw}{shown}", outs[fw], "steps_per_s", "steps/s")
                models[model][f"train_M{m}"] = train_entry(model, m, by_size, peak)

        print(f"importance-sampled log-likelihood, K={args.is_samples}:", flush=True)
        for model in args.models:
            images = max(1, args.is_images // 100) if model == "conv_vae" else args.is_images
            # Images per batch and samples per chunk, the same for both frameworks: chunks of 10,000 decoded rows
            # (500 for the conv decoder's 100 kB of activations per sample) were the fastest for both.
            batch, chunk = (10, 50) if model == "conv_vae" else (100, 100)
            batch, chunk = min(batch, images), min(chunk, args.is_samples)
            outs = {}
            for fw in ("jax", "torch"):
                task = {"kind": "is", "framework": fw, "model": model, "num_samples": args.is_samples,
                        "images": images, "batch_size": batch, "chunk": chunk, "data": data_for(model),
                        **({"peak_n": results["matmul_peak"]["n"]} if fw == "jax" else {})}
                outs[fw] = run_worker(task, args)
                show(f"{model} IS {fw} ({images} images)", outs[fw], "logw_per_s", "log-weights/s")
            models[model][f"is_K{args.is_samples}"] = is_entry(model, args.is_samples, images, outs, peak, chunk,
                                                                batch)

    results["models"] = models
    results["targets"] = check_targets(models)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    # The load average during the run counts the benchmark's own workers; the one at the start does not.
    if load_start[0] > 0.5:
        results["note"] = ("other jobs were using the machine when this run started (load average above): the "
                           "timings may be lower than on a quiet machine and the ratios less reliable; re-run on a "
                           "quiet machine for reference numbers")
    results["total_seconds"] = round(time.perf_counter() - start, 1)

    from benchmarks import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    table = report.markdown(results)
    (out / "latest.md").write_text(table)
    report.bar_chart(results, out / "latest.png")
    print()
    print(table)
    print(f"wrote {out / 'latest.json'}, {out / 'latest.md'}, {out / 'latest.png'} "
          f"({results['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
