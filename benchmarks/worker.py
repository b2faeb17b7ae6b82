"""One measurement in a fresh process: ``python -m benchmarks.worker '<task as JSON>'``.

Each measurement runs in its own process so that its peak resident memory (``ru_maxrss``) is its own, and so that
a JAX measurement never shares the machine's cores with idle PyTorch thread pools or the other way round. A JAX
task never imports torch and a torch task never imports JAX. The result is printed as one line
``RESULT {json}`` on stdout.

Tasks (``kind``): ``peak`` (float32 matmul FLOP/s), ``train`` (train-step throughput) and ``is``
(importance-sampled log-likelihood throughput), each for ``framework`` ``jax``, ``torch_eager`` or
``torch_compile`` (``is`` and ``peak``: ``jax`` or ``torch``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def rss_mb() -> float:
    """Peak resident set size of this process so far (MB): VmHWM, which starts afresh at exec (``ru_maxrss`` keeps
    the parent's peak across fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def objective_for(model: str, num_samples: int) -> str:
    """The VAEs train on the ELBO (analytic KL) with one sample and on the IWAE bound with more; the GMVAE on
    its own loss (free bits 0.5)."""
    if model == "gmvae":
        return "gmvae"
    return "elbo" if num_samples == 1 else "iwae"


#: Minor page faults per call over the timed repeats of the last :func:`timed_repeats` (reported with the result).
FAULTS: dict[str, float] = {}
#: Set from the task's ``interleaved`` flag: :func:`timed_repeats` then takes turns with other live workers.
INTERLEAVED = False
#: Interleaved repeats: seconds of untimed calls at the start of each turn (at least one call), in which the other
#: workers' idle threads stop spinning (PyTorch's OpenMP threads spin-wait for a while after their last parallel
#: region) and the caches fill again. One untimed call (3 ms of an MLP VAE step) was too short: the JAX MLP VAE's
#: step measured 244 and 299 steps/s interleaved with PyTorch workers at OpenMP's default wait policy, 351 and 345
#: with ``--torch-omp-passive``, 326-335 alone (``python -m benchmarks --models mlp_vae --interleave --no-compile
#: [--torch-omp-passive]``, 2 cores, 2026-12-06).
TURN_WARMUP_S = 0.1


def _await_turn() -> None:
    """Interleaved repeats: say so on stdout and block until the driver writes a line to stdin (or closes it)."""
    print("WAITING", flush=True)
    sys.stdin.readline()


def timed_repeats(run: Callable[[int], None], *, repeats: int, target_s: float, warmup_s: float,
                  interleaved: bool | None = None, record_faults: bool = True) -> list[float]:
    """Seconds per step over ``repeats`` runs of ``run(calls)`` (which must finish all its work before
    returning), with ``calls`` chosen so that one run takes about ``target_s``; after ``warmup_s`` of warm-up.
    Records the minor page faults per call of the timed runs in FAULTS (unless ``record_faults`` is False).
    ``interleaved`` (default :data:`INTERLEAVED`): each timed run
    waits for its turn (:func:`_await_turn`), starts with :data:`TURN_WARMUP_S` of untimed calls (the other workers
    have had the cores and caches meanwhile) and prints ``TIMED`` when it is done; after the last, it waits for the
    driver to close stdin."""
    interleaved = INTERLEAVED if interleaved is None else interleaved
    start = time.perf_counter()
    n = 0
    while True:
        run(1)
        n += 1
        if n >= 3 and time.perf_counter() - start > warmup_s:
            break
    t = time.perf_counter()
    run(2)
    per_call = (time.perf_counter() - t) / 2
    calls = max(2, int(round(target_s / max(per_call, 1e-6))))
    out, faults = [], 0
    for _ in range(repeats):
        if interleaved:
            _await_turn()
            turn = time.perf_counter()
            run(1)
            while time.perf_counter() - turn < TURN_WARMUP_S:
                run(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        run(calls)
        out.append((time.perf_counter() - t) / calls)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        if interleaved:
            print("TIMED", flush=True)
    if record_faults:
        FAULTS["minor_faults_per_call"] = faults / (repeats * calls)
    if interleaved:
        # Hold until the driver closes stdin, after every worker's last turn: a worker that went on (to exit, or to
        # time more) would share the cores with the last turns of the others. It did: the last repeat of the
        # framework whose turn came after another's last one ran at 0.2-0.6x its others (the seventh and eighth
        # sessions' interleaved runs, `repeat_steps_per_s`).
        sys.stdin.read()
    return out


# ----------------------------------------------------------------------------------------------------------------
# JAX
# ----------------------------------------------------------------------------------------------------------------


def _jax_stepping(fn: Callable, state: Any, arg: Any) -> Callable[[int], None]:
    """``run(calls)`` for :func:`timed_repeats`: ``calls`` updates ``state, metrics = fn(state, arg)`` back to back
    (the state carried from call to call), waiting for the last."""
    import jax

    box = [state]

    def run(calls: int) -> None:
        s = box[0]
        for _ in range(calls):
            s, m = fn(s, arg)
        jax.block_until_ready((s, m))
        box[0] = s

    return run


def _jax_setup():
    """Import JAX without TensorFlow; on GPUs, full float32 matmuls (no TF32), as PyTorch's default (CPU matmuls
    are full float32 either way)."""
    _no_tensorflow()
    import jax

    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
    return jax


def _jax_device() -> str:
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return d.platform if kind == d.platform else f"{d.platform}: {kind}"


def _no_tensorflow() -> None:
    """Keep TensorFlow out of a JAX process. TFP's JAX substrate (under distrax) imports TensorFlow whenever it is
    installed (the ``tfds`` extra installs it), which costs every JAX process ~600 MB of resident memory and ~8 s
    of import while playing no part in the computation; a user without TensorFlow never pays it."""
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]


def _jax_model(name: str, num_samples: int):
    from dlvm_jax.models.gmvae import GMVAE, GMVAEConfig, make_gmvae_loss
    from dlvm_jax.models.vae import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss

    if name == "gmvae":
        model = GMVAE(GMVAEConfig())
        return model, make_gmvae_loss(model, num_samples=num_samples, free_bits=0.5)
    cfg = VAEConfig() if name == "mlp_vae" else VAEConfig(data_shape=(28, 28, 1), latent_dim=2, network="conv")
    model = VAE(cfg)
    return model, make_loss(model, objective=objective_for(name, num_samples), num_samples=num_samples)


def _jax_data(task: dict[str, Any], n: int) -> np.ndarray:
    x = np.load(task["data"], allow_pickle=False)[:n]
    return x.reshape(-1, 28, 28, 1) if task["model"] == "conv_vae" else x


def _jax_matmuls(n: int) -> Callable[[int], None]:
    """``run(calls)``: that many float32 (n, n) @ (n, n) matmuls of fixed random operands back to back, waiting for
    the last (compiled and run once here)."""
    jax = _jax_setup()
    import jax.numpy as jnp

    a, b = (jax.random.normal(k, (n, n), jnp.float32) for k in jax.random.split(jax.random.key(0)))
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()

    def run(calls: int) -> None:
        for _ in range(calls):
            out = mm(a, b)
        out.block_until_ready()

    return run


def jax_peak(task: dict[str, Any]) -> dict[str, Any]:
    jax = _jax_setup()
    n = task["n"] if jax.default_backend() == "cpu" else max(task["n"], 8192)
    run = _jax_matmuls(n)
    times = timed_repeats(run, repeats=task["repeats"], target_s=task["target_s"], warmup_s=0.5)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "gflops_median": 2 * n**3 / statistics.median(times) / 1e9,
            "n": n, "device": _jax_device()}


def jax_matmul_probe(n: int, calls: int = 4) -> Callable[[], float]:
    """A function that runs ``calls`` of :func:`jax_peak`'s matmul back to back and returns their GFLOP/s, as one of
    :func:`jax_peak`'s repeats does (but ~0.2 s instead of 0.5 at n = 2048 on 2 cores): the peak sampled in passing,
    so that an IS measurement can be set against the peak of the same minutes."""
    run = _jax_matmuls(n)

    def probe() -> float:
        t = time.perf_counter()
        run(calls)
        return calls * 2 * n**3 / (time.perf_counter() - t) / 1e9

    return probe


def _dot_choice(fn: Any) -> dict[str, Any]:
    """The library that a ``dlvm_jax.runtime.tuned_jit`` chose for its matrix products, its timings of both (ms a
    call) and the seconds spent timing them (none for a library from before the choice: ``benchmarks.ab_commits``)."""
    return {"dot_library": getattr(fn, "dot_library", None), "dot_tuning_s": getattr(fn, "tuning_s", 0.0),
            "dot_tuning_ms": {k: v * 1e3 for k, v in getattr(fn, "dot_seconds", {}).items()}}


def jax_train(task: dict[str, Any]) -> dict[str, Any]:
    jax = _jax_setup()
    import jax.numpy as jnp
    import optax

    from dlvm_jax.objectives import microbatched
    from dlvm_jax.train import init_state, make_train_step

    model, loss_fn = _jax_model(task["model"], task["num_samples"])
    if task.get("microbatch"):
        loss_fn = microbatched(loss_fn, task["microbatch"])
    opt = optax.adam(1e-3)
    batch = jnp.asarray(_jax_data(task, task["batch_size"]))
    state = init_state(jax.jit(model.init)(jax.random.key(0)), opt, jax.random.key(1))
    step = make_train_step(loss_fn, opt)
    rss_setup = rss_mb()
    t = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    run = _jax_stepping(step, state, batch)
    times = timed_repeats(run, repeats=task["repeats"], target_s=task["target_s"], warmup_s=task["warmup_s"])
    step_s = statistics.median(times)
    out = {"steps_per_s": 1.0 / step_s, "repeat_steps_per_s": [1.0 / t for t in times],
           "rss_setup_mb": rss_setup, **_dot_choice(step)}
    out["compile_s"] = max(0.0, compile_s - step_s - out["dot_tuning_s"])
    if task.get("epoch"):
        out["peak_rss_mb"] = rss_mb()  # the step's, before the epoch's data and compilation
        out.update(_jax_epoch(task, model, loss_fn, opt))
    return out


def _jax_epoch(task: dict[str, Any], model: Any, loss_fn: Any, opt: Any) -> dict[str, Any]:
    """Steps/s of ``dlvm_jax.train.make_epoch`` on all of the task's data: one jitted ``lax.scan`` over an epoch's
    shuffled batches (the remainder left out), which is how ``fit`` trains models without convolutions. Timed after
    the step's repeats, on its own (interleaved: once every worker's turns are done, see :func:`timed_repeats`);
    the step's page-fault count is kept."""
    jax = _jax_setup()
    import jax.numpy as jnp

    from dlvm_jax.train import init_state, make_epoch

    data = jnp.asarray(np.load(task["data"], allow_pickle=False))
    batches = data.shape[0] // task["batch_size"]
    epoch = make_epoch(loss_fn, opt, batch_size=task["batch_size"])
    run = _jax_stepping(epoch, init_state(jax.jit(model.init)(jax.random.key(0)), opt, jax.random.key(1)), data)
    times = timed_repeats(run, repeats=task["repeats"], target_s=task["target_s"], warmup_s=task["warmup_s"],
                          interleaved=False, record_faults=False)
    return {"epoch_steps_per_s": batches / statistics.median(times), "epoch_batches": batches}


def jax_is(task: dict[str, Any]) -> dict[str, Any]:
    jax = _jax_setup()
    import jax.numpy as jnp

    from dlvm_jax.likelihood import make_batch_estimator

    model, _ = _jax_model(task["model"], 1)
    data = _jax_data(task, task["images"])
    params = jax.jit(model.init)(jax.random.key(0))
    estimate = make_batch_estimator(model, num_samples=task["num_samples"], chunk_size=task["chunk"])
    bs = task["batch_size"]
    key = jax.random.key(2)
    rss_setup = rss_mb()
    t = time.perf_counter()
    jax.block_until_ready(estimate(params, jnp.asarray(data[:bs]), jax.random.fold_in(key, 10**6)))  # compile
    compile_s = time.perf_counter() - t
    batches = [jnp.asarray(data[i:i + bs]) for i in range(0, data.shape[0], bs)]
    jax.block_until_ready(estimate(params, batches[0], jax.random.fold_in(key, 10**6 + 1)))  # warm-up, as for PyTorch
    # The matmul peak, sampled before and after every timed batch (outside the timings), for the fraction of the
    # peak of the same minutes: the shared host's speed drifts by a fifth over a run.
    probe = jax_matmul_probe(task["peak_n"]) if task.get("peak_n") else None
    peaks = [probe()] if probe else []
    seconds, log_px = [], []
    for i, b in enumerate(batches):
        t = time.perf_counter()
        out = jax.block_until_ready(estimate(params, b, jax.random.fold_in(key, i)))
        seconds.append(time.perf_counter() - t)
        log_px.append(np.asarray(out.log_px))
        if probe:
            peaks.append(probe())
    n_logw = data.shape[0] * task["num_samples"]
    # the first call less one batch's run time and the time spent timing the two dot libraries
    dots = _dot_choice(estimate)
    compile_s = max(0.0, compile_s - statistics.median(seconds) - dots["dot_tuning_s"])
    out = {"logw_per_s": n_logw / sum(seconds), "seconds": sum(seconds), "compile_s": compile_s,
           "batch_seconds": seconds, "log_px_mean": float(np.mean(np.concatenate(log_px))),
           "rss_setup_mb": rss_setup, **dots}
    if peaks:
        out.update(adjacent_peak_gflops=max(peaks), adjacent_peak_samples_gflops=peaks)
    return out


# ----------------------------------------------------------------------------------------------------------------
# PyTorch
# ----------------------------------------------------------------------------------------------------------------


def _torch_setup():
    """PyTorch on the GPU when one is present, else the CPU with one thread per core; full float32 (no TF32)."""
    import torch

    torch.set_num_threads(cores())
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch


def _torch_device(torch) -> Any:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(torch, device) -> None:
    """Wait for queued GPU work before a clock stops (CPU operations are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torch_device_name(torch, device) -> str:
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def _torch_model(name: str):
    from benchmarks import torch_models as tm

    return {"mlp_vae": tm.mlp_vae, "conv_vae": tm.conv_vae, "gmvae": tm.GMVAE}[name]()


def _torch_data(torch, task: dict[str, Any], n: int):
    x = np.load(task["data"], allow_pickle=False)[:n]
    if task["model"] == "conv_vae":
        x = x.reshape(-1, 1, 28, 28)
    return torch.from_numpy(np.ascontiguousarray(x)).to(_torch_device(torch))


def torch_peak(task: dict[str, Any]) -> dict[str, Any]:
    torch = _torch_setup()
    device = _torch_device(torch)
    n = task["n"] if device.type == "cpu" else max(task["n"], 8192)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)

    def run(calls: int) -> None:
        for _ in range(calls):
            torch.mm(a, b, out=out)
        _sync(torch, device)

    times = timed_repeats(run, repeats=task["repeats"], target_s=task["target_s"], warmup_s=0.5)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "gflops_median": 2 * n**3 / statistics.median(times) / 1e9,
            "n": n, "device": _torch_device_name(torch, device)}


def torch_train(task: dict[str, Any]) -> dict[str, Any]:
    torch = _torch_setup()
    name, m = task["model"], task["num_samples"]
    device = _torch_device(torch)
    model = _torch_model(name).to(device)
    x = _torch_data(torch, task, task["batch_size"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # one fused kernel for all parameters
    if name == "gmvae":
        def loss_fn(x):
            return model.loss(x, m, 0.5)
    else:
        objective = objective_for(name, m)

        def loss_fn(x):
            return model.loss(x, objective, m)

    compiled = task["framework"] == "torch_compile"
    if compiled:
        loss_fn = torch.compile(loss_fn)

    # Gradient accumulation over microbatches when the task asks for it (as dlvm_jax.objectives.microbatched):
    # the mean of the microbatches' mean losses, one backward pass each.
    chunks = x.split(task["microbatch"]) if task.get("microbatch") else (x,)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for chunk in chunks:
            loss = loss_fn(chunk) / len(chunks)
            loss.backward()
        opt.step()

    rss_setup = rss_mb()
    t = time.perf_counter()
    step()
    _sync(torch, device)
    first_s = time.perf_counter() - t

    def run(calls: int) -> None:
        for _ in range(calls):
            step()
        _sync(torch, device)

    times = timed_repeats(run, repeats=task["repeats"], target_s=task["target_s"], warmup_s=task["warmup_s"])
    out = {"steps_per_s": 1.0 / statistics.median(times), "repeat_steps_per_s": [1.0 / t for t in times],
           "rss_setup_mb": rss_setup}
    if compiled:
        out["compile_s"] = max(0.0, first_s - statistics.median(times))
    return out


def torch_is(task: dict[str, Any]) -> dict[str, Any]:
    torch = _torch_setup()
    from benchmarks import torch_models as tm

    model = _torch_model(task["model"]).to(_torch_device(torch))
    data = _torch_data(torch, task, task["images"])
    bs, k, chunk = task["batch_size"], task["num_samples"], task["chunk"]
    rss_setup = rss_mb()
    tm.log_likelihood(model, data[:bs], min(k, 2 * chunk), chunk)  # warm-up (oneDNN primitive caches)
    seconds, log_px = [], []
    for i in range(0, data.shape[0], bs):
        t = time.perf_counter()
        log_px.append(tm.log_likelihood(model, data[i:i + bs], k, chunk).cpu().numpy())  # .cpu() waits
        seconds.append(time.perf_counter() - t)
    n_logw = data.shape[0] * k
    return {"logw_per_s": n_logw / sum(seconds), "seconds": sum(seconds), "batch_seconds": seconds,
            "log_px_mean": float(np.mean(np.concatenate(log_px))), "rss_setup_mb": rss_setup}


TASKS = {
    ("peak", "jax"): jax_peak, ("peak", "torch"): torch_peak,
    ("train", "jax"): jax_train, ("train", "torch_eager"): torch_train, ("train", "torch_compile"): torch_train,
    ("is", "jax"): jax_is, ("is", "torch"): torch_is,
}


def main(argv: list[str]) -> int:
    global INTERLEAVED
    task = json.loads(argv[0])
    INTERLEAVED = bool(task.get("interleaved"))
    # Before either framework starts its threads (see dlvm_jax.runtime); the same for JAX and PyTorch.
    keep = task.get("keep_freed_memory", False)
    if keep:
        from dlvm_jax.runtime import keep_freed_memory

        keep = keep_freed_memory()
    if "temp_heap_bytes" in task:  # JAX: dlvm_jax.runtime's per-heap limit of temporaries (0: XLA's one block)
        from dlvm_jax import runtime

        runtime.TEMP_HEAP_BYTES = int(task["temp_heap_bytes"])
    try:
        out = TASKS[(task["kind"], task["framework"])](task)
        out.setdefault("peak_rss_mb", rss_mb())
        out.update(FAULTS)
        if "rss_setup_mb" in out:
            out["rss_increase_mb"] = out["peak_rss_mb"] - out["rss_setup_mb"]
    except Exception as err:  # recorded in the JSON (e.g. torch.compile without a working C++ compiler)
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        out = {"error": f"{type(err).__name__}: {lines[0] if lines else ''}"[:500],
               "traceback_tail": traceback.format_exc().splitlines()[-6:]}
    out["threads"] = cores()
    out["malloc_keeps_freed_memory"] = keep
    if task["framework"] == "jax":
        from dlvm_jax import runtime

        out["temp_heap_bytes"] = runtime.TEMP_HEAP_BYTES
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
