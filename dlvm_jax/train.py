"""Jitted optax training: TrainState, a donated train step, whole epochs on device, a fit loop with a progress bar,
JSON-lines metrics, msgpack parameter files, and orbax checkpoints to resume from.

One step (jitted, state donated): ``key, step_key = split(state.key)``; ``value_and_grad`` of the loss;
``optimizer.update``; ``optax.apply_updates``. One epoch: a shuffled permutation of the device-resident data,
reshaped into batches, consumed by ``lax.scan`` of the step: no host synchronisation inside an epoch.

Devices: :func:`fit` and :func:`fit_restarts` run on a :mod:`dlvm_jax.parallel` mesh (all devices by default):
every batch is split over the devices, the state and the data are replicated, and the result is the same function
of the global batch and key on any number of devices.

Health: every step also reports which loss terms and which parameters' gradients were non-finite. The fit loops
stop at the end of an epoch that had such a step, naming its step and terms, and never checkpoint that state; with
``skip_nonfinite=True`` such updates are skipped instead (parameters and optimizer state kept as they were).

Checkpoints (:mod:`dlvm_jax.checkpoint`): the state (parameters, optimizer state, PRNG key, step), the epoch and the
position in it, the key that ordered the current epoch's data, the history and the length of the metrics log. With
``resume=True`` a fit loop continues from the latest checkpoint, cuts the metrics log back to what it held then, and
gives the same parameters and metrics as a run that was never interrupted.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dlvm_jax import noise, parallel
from dlvm_jax.checkpoint import CheckpointError, Checkpoints, host_array, leaf_name
from dlvm_jax.objectives import LossFn, Metrics, MicrobatchedLoss, value_and_grad
from dlvm_jax.runtime import tuned_jit

Params = Any

#: The step passed to loss functions in evaluation (past any KL warm-up).
EVAL_STEP = 10**9


class TrainState(NamedTuple):
    """Everything that moves between steps."""

    params: Params
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def init_state(params: Params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(params, optimizer.init(params), key, jnp.zeros((), jnp.int32))


def _nonfinite_flags(loss: jax.Array, metrics: Metrics, grads: Params) -> dict[str, dict[str, jax.Array]]:
    """``{"terms": {name: bool}, "grads": {parameter path: bool}}``: True where a loss term (the loss and every
    metric) or a parameter's gradient holds a NaN or an infinity."""
    terms = {"loss": ~jnp.all(jnp.isfinite(loss))}
    terms.update({str(k): ~jnp.all(jnp.isfinite(v)) for k, v in metrics.items() if k != "loss"})
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return {"terms": terms, "grads": {leaf_name(path) or "params": ~jnp.all(jnp.isfinite(g)) for path, g in flat}}


def _checked_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState, batch: jax.Array, *,
                  mesh: Any = None, skip_nonfinite: bool = False) -> tuple[TrainState, Metrics, dict[str, Any]]:
    """One update and its non-finite flags; with ``skip_nonfinite`` a flagged update leaves the parameters and the
    optimizer state as they were (the key and the step counter still advance)."""
    batch = parallel.constrain_batch(batch, mesh)
    key, step_key = noise.split(state.key)
    (loss, metrics), grads = value_and_grad(loss_fn, state.params, batch, step_key, state.step,
                                            constrain=lambda b: parallel.constrain_batch(b, mesh))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    flags = _nonfinite_flags(loss, metrics, grads)
    if skip_nonfinite:
        ok = ~jnp.any(jnp.stack(jax.tree.leaves(flags)))
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    return TrainState(params, opt_state, key, state.step + 1), metrics, flags


def _step(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState,
          batch: jax.Array) -> tuple[TrainState, Metrics]:
    key, step_key = noise.split(state.key)
    (_, metrics), grads = value_and_grad(loss_fn, state.params, batch, step_key, state.step)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, key, state.step + 1), metrics


def _jit_kwargs(mesh: Any, *, batch_leading: int | None = 0) -> dict[str, Any]:
    """Shardings of a ``(state, batch_or_data) -> outputs`` function: state replicated, the second argument split
    along axis ``batch_leading`` over the devices (None: replicated), every output replicated."""
    if mesh is None:
        return {}
    repl = parallel.replicated(mesh)
    second = repl if batch_leading is None else parallel.batch_sharding(mesh, leading=batch_leading)
    return {"in_shardings": (repl, second), "out_shardings": repl}


def _check_microbatch(loss_fn: LossFn, mesh: Any, batch_size: int | None = None) -> None:
    """A :class:`~dlvm_jax.objectives.MicrobatchedLoss`'s microbatches must cut the batch and split evenly over
    ``mesh``'s devices."""
    if not isinstance(loss_fn, MicrobatchedLoss):
        return
    if batch_size is not None and batch_size % loss_fn.size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the microbatch size {loss_fn.size}; use a "
                         f"batch size that is, or a microbatch size that divides {batch_size}")
    if mesh is not None and loss_fn.size % parallel.num_shards(mesh):
        n = parallel.num_shards(mesh)
        raise ValueError(f"microbatches of {loss_fn.size} examples cannot be split evenly over {n} devices; use a "
                         f"microbatch size that is a multiple of {n}, or fewer devices (--devices)")


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, mesh: Any = None,
                    skip_nonfinite: bool = False) -> Callable:
    """Jitted ``step(state, batch) -> (state, metrics)``; the incoming state's buffers are donated. With a
    :mod:`~dlvm_jax.parallel` ``mesh`` the state must be replicated on it and the batch is split over its devices;
    ``skip_nonfinite`` skips updates with a non-finite loss term or gradient. A
    :func:`~dlvm_jax.objectives.microbatched` loss has its gradient accumulated over its microbatches inside the step
    (its microbatch size a multiple of the mesh's devices)."""
    _check_microbatch(loss_fn, mesh)
    if mesh is None and not skip_nonfinite:
        return tuned_jit(lambda state, batch: _step(loss_fn, optimizer, state, batch), donate_argnums=0)
    step = functools.partial(_checked_step, loss_fn, optimizer, mesh=mesh, skip_nonfinite=skip_nonfinite)
    return tuned_jit(lambda state, batch: step(state, batch)[:2], donate_argnums=0, **_jit_kwargs(mesh))


def check_batch_size(batch_size: int, num_examples: int) -> int:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size}")
    if batch_size > num_examples:
        raise ValueError(f"batch size {batch_size} is larger than the dataset ({num_examples} examples); "
                         f"use --batch-size {num_examples} or less")
    return int(batch_size)


def shuffled_batches(key: jax.Array, data: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """``(next_key, batches)``: a random permutation of ``data`` cut into full batches of shape
    (num_batches, batch_size, ...); the remainder that does not fill a batch is left out."""
    key, perm_key = jax.random.split(key)
    num_batches = data.shape[0] // batch_size
    perm = jax.random.permutation(perm_key, data.shape[0])[: num_batches * batch_size]
    return key, data[perm].reshape((num_batches, batch_size) + data.shape[1:])


def _reduce_epoch(metrics: Metrics, flags: dict[str, Any], *, skip_nonfinite: bool = False
                  ) -> tuple[Metrics, dict[str, Any]]:
    """Per-step metrics and flags (leading axis: the steps of an epoch) -> (epoch means, health). Health: the
    number of flagged steps, the index of the first (-1 if none) and its flags. Skipped steps are left out of the
    means (NaN if every step was skipped)."""
    bad = jnp.any(jnp.stack(jax.tree.leaves(flags), axis=-1), axis=-1)
    num_bad = jnp.sum(bad.astype(jnp.int32))
    first = jnp.argmax(bad)
    health = {"bad_steps": num_bad, "first_bad": jnp.where(num_bad > 0, first, -1).astype(jnp.int32),
              "flags": jax.tree.map(lambda f: f[first], flags)}
    if not skip_nonfinite:
        return jax.tree.map(jnp.mean, metrics), health
    num_good = bad.shape[0] - num_bad

    def good_mean(m: jax.Array) -> jax.Array:
        good = (~bad).reshape(bad.shape + (1,) * (m.ndim - 1))
        total = jnp.sum(jnp.where(good, m, 0)) / max(1, m.size // bad.shape[0])
        return jnp.where(num_good > 0, total / jnp.maximum(num_good, 1), jnp.nan)

    return jax.tree.map(good_mean, metrics), health


def _epoch_with_health(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int, mesh: Any,
                       skip_nonfinite: bool) -> Callable:
    def epoch(state: TrainState, data: jax.Array) -> tuple[TrainState, Metrics, dict[str, Any]]:
        key, batches = shuffled_batches(state.key, data, batch_size)
        batches = parallel.constrain_batch(batches, mesh, leading=1)
        step = functools.partial(_checked_step, loss_fn, optimizer, mesh=mesh, skip_nonfinite=skip_nonfinite)

        def body(s: TrainState, b: jax.Array) -> tuple[TrainState, tuple[Metrics, dict[str, Any]]]:
            s, m, f = step(s, b)
            return s, (m, f)

        state, (metrics, flags) = jax.lax.scan(body, state._replace(key=key), batches)
        means, health = _reduce_epoch(metrics, flags, skip_nonfinite=skip_nonfinite)
        return state, means, health

    return epoch


def epoch_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int, mesh: Any = None,
             skip_nonfinite: bool = False) -> Callable:
    """Unjitted ``epoch(state, data) -> (state, mean metrics)``: one pass over a random permutation of ``data``
    (the remainder that does not fill a batch is left out of this epoch), ``lax.scan`` over the batches.
    Compose it freely (``jax.vmap`` over independent restarts, ``jax.jit``); :func:`make_epoch` jits it. With a
    ``mesh`` each batch is split over its devices."""
    if mesh is None and not skip_nonfinite:
        def epoch(state: TrainState, data: jax.Array) -> tuple[TrainState, Metrics]:
            key, batches = shuffled_batches(state.key, data, batch_size)
            state, metrics = jax.lax.scan(lambda s, b: _step(loss_fn, optimizer, s, b), state._replace(key=key),
                                          batches)
            return state, jax.tree.map(jnp.mean, metrics)

        return epoch
    inner = _epoch_with_health(loss_fn, optimizer, batch_size=batch_size, mesh=mesh, skip_nonfinite=skip_nonfinite)
    return lambda state, data: inner(state, data)[:2]


def _dots_of_step(step: tuned_jit, batch_size: int) -> Callable[[TrainState, jax.Array], str]:
    """For an epoch's :class:`~dlvm_jax.runtime.tuned_jit`: the dot library that its train step ``step`` chooses on
    the data's first batch (compiled, and on a CPU timed on copies of the state, without running on the state)."""
    def choose(state: TrainState, data: jax.Array) -> str:
        step.lower(state, data[:batch_size])
        return step.dot_library

    return choose


def make_epoch(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int, mesh: Any = None,
               skip_nonfinite: bool = False) -> Callable:
    """Jitted, state-donating :func:`epoch_fn` (with a ``mesh``: state and data replicated on it). On a CPU it runs
    its matrix products with the library that its train step (:func:`make_train_step`) runs fastest
    (:class:`~dlvm_jax.runtime.tuned_jit`)."""
    step = make_train_step(loss_fn, optimizer, mesh=mesh, skip_nonfinite=skip_nonfinite)
    return tuned_jit(epoch_fn(loss_fn, optimizer, batch_size=batch_size, mesh=mesh, skip_nonfinite=skip_nonfinite),
                     donate_argnums=0, dots_from=_dots_of_step(step, batch_size),
                     **_jit_kwargs(mesh, batch_leading=None))


class _Engine:
    """The compiled pieces of one training setup: the scanned epoch, and the step, shuffle and reduction that
    drive an epoch one dispatch per step. Each is compiled on first use."""

    def __init__(self, loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int, mesh: Any,
                 skip_nonfinite: bool) -> None:
        self.batch_size = batch_size
        self.mesh = mesh
        self.skip_nonfinite = skip_nonfinite
        step = functools.partial(_checked_step, loss_fn, optimizer, mesh=mesh, skip_nonfinite=skip_nonfinite)
        self.step = tuned_jit(step, donate_argnums=0, **_jit_kwargs(mesh))
        self.scan_epoch = tuned_jit(
            _epoch_with_health(loss_fn, optimizer, batch_size=batch_size, mesh=mesh, skip_nonfinite=skip_nonfinite),
            donate_argnums=0, dots_from=_dots_of_step(self.step, batch_size), **_jit_kwargs(mesh, batch_leading=None))
        shuffle_kwargs = {}
        if mesh is not None:
            shuffle_kwargs = {"out_shardings": (parallel.replicated(mesh), parallel.batch_sharding(mesh, leading=1))}
        self.shuffle = jax.jit(lambda key, data: shuffled_batches(key, data, batch_size), **shuffle_kwargs)
        self.reduce = jax.jit(functools.partial(_reduce_epoch, skip_nonfinite=skip_nonfinite))

    def stepped_epoch(self, state: TrainState, data: jax.Array, *, start: int = 0, epoch_key: jax.Array | None = None,
                      done: tuple[Metrics, dict[str, Any]] | None = None,
                      after_step: Callable[[int, TrainState, Callable[[], Any]], None] | None = None
                      ) -> tuple[TrainState, Metrics, dict[str, Any]]:
        """One epoch, one jitted step per batch; metrics stay on the device until the epoch ends. ``start`` > 0
        finishes an epoch begun from ``epoch_key`` whose first ``start`` steps gave the (stacked) per-step metrics
        and flags ``done``. ``after_step(i, state, collected)`` runs after batch ``i``; ``collected()`` gives the
        stacked metrics and flags of the epoch so far (e.g. to checkpoint)."""
        key, batches = self.shuffle(state.key if epoch_key is None else epoch_key, data)
        if start == 0:
            state = state._replace(key=key)
        metrics: list[Metrics] = []
        flags: list[dict[str, Any]] = []

        def collected() -> tuple[Metrics, dict[str, Any]]:
            stacked = (_stack(metrics), _stack(flags))
            if done is None:
                return stacked
            return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), done, stacked)

        for i in range(start, batches.shape[0]):
            state, m, f = self.step(state, batches[i])
            metrics.append(m)
            flags.append(f)
            if after_step is not None:
                after_step(i, state, collected)
        means, health = self.reduce(*collected())
        return state, means, health


def _stack(items: list[Any]) -> Any:
    return jax.tree.map(lambda *v: jnp.stack(v), *items)


def make_stepped_epoch(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int,
                       mesh: Any = None, skip_nonfinite: bool = False) -> Callable:
    """Same contract as :func:`make_epoch`, but one dispatch of the jitted, donated step per batch instead of one
    ``lax.scan``. Metrics stay on the device until the epoch ends (no host synchronisation per step). On XLA's CPU
    backend the gradients of convolutions can compile to much slower code inside a scan than in a standalone
    step (measured ~10x for :class:`~dlvm_jax.networks.ConvDecoder`), so ``fit(..., scan=False)`` uses this."""
    engine = _Engine(loss_fn, optimizer, batch_size=batch_size, mesh=mesh, skip_nonfinite=skip_nonfinite)
    return lambda state, data: engine.stepped_epoch(state, data)[:2]


def eval_batch_size(batch_size: int) -> int:
    """Evaluation batches: the smallest multiple of the training batch size that holds at least 100 examples (so
    they split over the same devices, and the numbers do not depend on how many there are)."""
    return batch_size * max(1, -(-100 // batch_size))


def make_evaluator(loss_fn: LossFn, *, batch_size: int, mesh: Any = None) -> Callable:
    """``evaluate(params, data, key) -> metrics``: loss metrics averaged over every example of ``data``
    (full batches by ``lax.map`` in one jitted call, each split over the devices of ``mesh``, the remainder in a
    second one)."""

    @functools.partial(jax.jit, static_argnums=3)
    def full_batches(params: Params, batches: jax.Array, key: jax.Array, split: bool) -> Metrics:
        keys = jax.random.split(key, batches.shape[0])
        if split:
            batches = parallel.constrain_batch(batches, mesh, leading=1)
        metrics = jax.lax.map(lambda kb: loss_fn(params, kb[1], kb[0], jnp.asarray(EVAL_STEP))[1], (keys, batches))
        return jax.tree.map(jnp.mean, metrics)

    remainder = jax.jit(lambda params, batch, key: loss_fn(params, batch, key, jnp.asarray(EVAL_STEP))[1])

    def evaluate(params: Params, data: jax.Array, key: jax.Array) -> dict[str, float]:
        n = data.shape[0]
        bs = min(batch_size, n)
        nb = n // bs
        split = mesh is not None and bs % parallel.num_shards(mesh) == 0
        k_full, k_rem = jax.random.split(key)
        out = full_batches(params, data[: nb * bs].reshape((nb, bs) + data.shape[1:]), k_full, split)
        result = {k: float(v) * nb * bs for k, v in out.items()}
        if nb * bs < n:
            rem = remainder(params, data[nb * bs:], k_rem)
            result = {k: v + float(rem[k]) * (n - nb * bs) for k, v in result.items()}
        return {k: v / n for k, v in result.items()}

    return evaluate


# ------------------------------------------------------------------------------------------------------------
# Files: parameters (msgpack, never pickle) and metrics (JSON lines)
# ------------------------------------------------------------------------------------------------------------


def save_params(path: str | os.PathLike, params: Params) -> None:
    """Write ``params`` as msgpack, atomically (a temporary file renamed into place); missing folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(flax.serialization.to_bytes(jax.tree.map(host_array, params)))
    os.replace(tmp, path)


def load_params(path: str | os.PathLike, template: Params) -> Params:
    """Read msgpack parameters into the structure of ``template`` (e.g. freshly initialised parameters)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no parameter file at {path}")
    try:
        return flax.serialization.from_bytes(template, path.read_bytes())
    except Exception as err:  # msgpack / structure errors: report one clear line
        raise ValueError(f"cannot read parameters from {path}: {type(err).__name__}: {err}".splitlines()[0]) from None


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------------------------------------
# The fit loops' bookkeeping: history, metrics log, checkpoints, non-finite reports
# ------------------------------------------------------------------------------------------------------------


def _normalise(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, numpy scalars Python numbers)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint written for other data or another configuration, naming the first difference."""
    s, c = _flatten(saved), _flatten(current)
    if "train_shape" in s and s["train_shape"] != c.get("train_shape"):
        raise CheckpointError(f"the training data has shape {tuple(c.get('train_shape') or ())}, but checkpoint "
                              f"{where} was trained on data of shape {tuple(s['train_shape'])}; resume with the "
                              "run's own data")
    missing = object()
    for k in sorted(set(s) | set(c)):
        if s.get(k, missing) != c.get(k, missing):
            there = repr(s[k]) if k in s else "not set"
            here = repr(c[k]) if k in c else "not set"
            raise CheckpointError(f"checkpoint {where} was written for another model or configuration: {k} is "
                                  f"{there} there and {here} here")


def _check_every(checkpoint_every: int | None) -> int | None:
    if checkpoint_every is None:
        return None
    if int(checkpoint_every) != checkpoint_every or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every (steps between checkpoints) must be an integer >= 1, got "
                         f"{checkpoint_every}")
    return int(checkpoint_every)


class _RunLog:
    """One fit loop's history, its JSON-lines log (``metrics_path``) and its checkpoints (``checkpoint_dir``).

    A checkpoint records how many bytes the log held when it was written; resuming cuts the log back to that, so
    records written after the last checkpoint (which the resumed run writes again) appear once."""

    def __init__(self, *, metrics_path: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None,
                 keep: int, every: int | None, fingerprint: dict[str, Any]) -> None:
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.ckpt = Checkpoints(checkpoint_dir, max_to_keep=keep) if checkpoint_dir is not None else None
        self.every = _check_every(every)
        self.fingerprint = _normalise(fingerprint)
        self.history: list[dict[str, Any]] = []
        self.elapsed0 = 0.0
        self.start = time.perf_counter()
        self.last_saved: int | None = None
        self.writer = jax.process_index() == 0

    def seconds(self) -> float:
        return round(self.elapsed0 + time.perf_counter() - self.start, 3)

    def begin(self, template: Any, *, resume: bool, after_restore: Callable[[dict[str, Any]], None] | None = None
              ) -> tuple[Any, dict[str, Any] | None]:
        """A fresh start (refused over existing checkpoints), or ``(restored tree, meta)`` of the latest one
        (``after_restore(meta)`` runs once it is restored and checked)."""
        if not resume:
            if self.ckpt is not None and self.ckpt.steps():
                raise ValueError(f"{self.ckpt.directory} already holds checkpoints (steps "
                                 f"{', '.join(map(str, self.ckpt.steps()))}); resume from them (resume=True, "
                                 "dlvm train --resume RUN_DIR) or choose another directory")
            return None, None
        if self.ckpt is None:
            raise ValueError("resume=True needs the checkpoint_dir to resume from")
        meta = self.ckpt.read_meta()
        _check_fingerprint(meta.get("fingerprint") or {}, self.fingerprint,
                           str(self.ckpt.directory / str(meta["step"])))
        tree, meta = self.ckpt.restore(template, meta=meta)
        # Everything checked: now (and only now) touch the metrics log.
        self.history = list(meta.get("history") or [])
        self.elapsed0 = float(meta.get("seconds") or 0.0)
        self.last_saved = int(meta["step"])
        self._rewind(meta.get("metrics_bytes"))
        if after_restore is not None:
            after_restore(meta)
        self.start = time.perf_counter()
        return tree, meta

    def _rewind(self, size: int | None) -> None:
        if self.metrics_path is None or not self.writer:
            return
        p = self.metrics_path
        if size is not None and p.is_file() and p.stat().st_size >= size:
            os.truncate(p, size)
        else:  # the log is shorter than at the checkpoint (lost or cut): write it again from the history
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")
            os.replace(tmp, p)

    def append(self, rec: dict[str, Any], *, history: bool = True) -> None:
        if history:
            self.history.append(rec)
        if self.metrics_path is not None and self.writer:
            append_jsonl(self.metrics_path, rec)

    def due(self, step: int, *, evaluated: bool) -> bool:
        """Is a checkpoint due at the end of an epoch at ``step``? (At evaluations, or when ``step`` passed a
        multiple of ``every`` since the last checkpoint.)"""
        if self.ckpt is None:
            return False
        if self.every is None:
            return evaluated
        return step // self.every > (self.last_saved or 0) // self.every

    def save(self, step: int, tree: Any, *, epoch: int, batch: int = 0, partial: Any = None) -> None:
        if self.ckpt is None or step == self.last_saved:
            return
        size = None
        if self.metrics_path is not None and self.metrics_path.is_file():
            size = self.metrics_path.stat().st_size
        meta = {"epoch": int(epoch), "batch": int(batch), "history": self.history, "metrics_bytes": size,
                "seconds": self.seconds(), "fingerprint": self.fingerprint, "partial": partial}
        self.ckpt.save(int(step), tree, meta)
        self.last_saved = int(step)

    def kept(self) -> str:
        if self.ckpt is None:
            return "no checkpoints were asked for"
        latest = self.ckpt.latest_step()
        if latest is None:
            return "no checkpoint was written"
        return f"the last good checkpoint (step {latest}) is kept in {self.ckpt.directory}"

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


def _nonfinite_message(*, epoch: int, step: int, batch: int, num_batches: int, flags: dict[str, Any],
                       log: _RunLog, restart: int | None = None) -> str:
    """One line naming where training went non-finite and which loss terms and gradients did."""
    terms = [k for k, v in flags["terms"].items() if bool(np.any(v))]
    grads = [k for k, v in flags["grads"].items() if bool(np.any(v))]
    parts = []
    if terms:
        parts.append(f"loss term{'s' if len(terms) > 1 else ''} " + ", ".join(repr(t) for t in terms))
    if grads:
        more = f" and {len(grads) - 3} more" if len(grads) > 3 else ""
        parts.append(f"gradient{'s' if len(grads) > 1 else ''} of " + ", ".join(repr(g) for g in grads[:3]) + more)
    where = f" in restart {restart}" if restart is not None else ""
    return (f"training went non-finite in epoch {epoch} at step {step} (batch {batch} of {num_batches}){where}: "
            f"{' and '.join(parts) or 'unknown term'}; {log.kept()}; lower the learning rate, or skip such updates "
            "(skip_nonfinite=True, dlvm train --skip-nonfinite)")


def _pack_partial(metrics: Metrics, flags: dict[str, Any]) -> dict[str, Any]:
    """Per-step metrics and flags of a part-done epoch, as exact JSON (float32 values survive a round trip)."""
    m, f = jax.device_get((metrics, flags))
    return {"metrics": {k: {"dtype": str(np.asarray(v).dtype), "values": np.asarray(v).tolist()} for k, v in m.items()},
            "flags": jax.tree.map(lambda a: np.asarray(a).tolist(), f)}


def _unpack_partial(partial: dict[str, Any] | None, mesh: Any) -> tuple[Metrics, dict[str, Any]] | None:
    if not partial:
        return None
    metrics = {k: np.asarray(v["values"], dtype=np.dtype(v["dtype"])) for k, v in partial["metrics"].items()}
    flags = jax.tree.map(lambda a: np.asarray(a, dtype=bool), partial["flags"], is_leaf=lambda x: isinstance(x, list))
    return parallel.replicate((metrics, flags), mesh)


def _as_host_or_device(x: Any) -> Any:
    return x if isinstance(x, jax.Array) else np.asarray(x)


# ------------------------------------------------------------------------------------------------------------
# The fit loop
# ------------------------------------------------------------------------------------------------------------


def fit(
    state: TrainState,
    train_data: Any,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    epochs: int,
    test_data: Any | None = None,
    eval_loss_fn: LossFn | None = None,
    eval_every: int = 1,
    metrics_path: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    eval_key: jax.Array | None = None,
    scan: bool = True,
    mesh: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    skip_nonfinite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    after_restore: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train for ``epochs`` epochs (or until ``time_limit`` seconds). Returns the final state and the history.

    Test metrics (``eval_loss_fn``, default ``loss_fn``) are computed before training (epoch 0), every
    ``eval_every`` epochs and at the end; each record is appended to ``metrics_path`` (JSON lines) and the
    parameters are written to ``checkpoint_path`` (msgpack) after each evaluation. ``scan=False`` dispatches one
    jitted step per batch (:func:`make_stepped_epoch`) instead of scanning over the epoch; the two give the same
    parameters.

    Devices: ``mesh`` (default :func:`dlvm_jax.parallel.make_mesh`, every device) splits each batch over its
    devices; ``batch_size`` must be a multiple of their number.

    Checkpoints (orbax, in ``checkpoint_dir``): at the start, every ``checkpoint_every`` steps (default: at each
    evaluation) and at the end; the last ``keep_checkpoints`` are kept. With ``scan=True`` a checkpoint falls at
    the end of the epoch in which its step falls; with ``scan=False`` exactly on it. ``resume=True`` continues
    from the latest checkpoint in ``checkpoint_dir`` (``state`` then only gives the structure), cutting the metrics
    log back to its length at that checkpoint; a checkpoint of other data (shape), another batch size, or another
    ``fingerprint`` (any JSON-able description of the configuration) is refused; ``after_restore(meta)`` runs
    once the checkpoint is restored and checked, before training goes on.

    A non-finite loss term or gradient raises :class:`FloatingPointError` naming the step and the terms (nothing
    of that epoch is recorded or checkpointed); with ``skip_nonfinite=True`` such updates are skipped instead and
    counted in the ``train_skipped_steps`` metric.
    """
    train_data = _as_host_or_device(train_data)
    batch_size = check_batch_size(batch_size, train_data.shape[0])
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    eval_every = max(1, int(eval_every))
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_divisible(batch_size, mesh)
    _check_microbatch(loss_fn, mesh, batch_size)
    num_batches = train_data.shape[0] // batch_size
    engine = _Engine(loss_fn, optimizer, batch_size=batch_size, mesh=mesh, skip_nonfinite=skip_nonfinite)
    evaluate = None
    if test_data is not None:
        test_data = parallel.replicate(_as_host_or_device(test_data), mesh)
        evaluate = make_evaluator(eval_loss_fn or loss_fn, batch_size=eval_batch_size(batch_size), mesh=mesh)
    eval_key = parallel.replicate(jax.random.key(12345) if eval_key is None else eval_key, mesh)
    log = _RunLog(metrics_path=metrics_path, checkpoint_dir=checkpoint_dir, keep=keep_checkpoints,
                  every=checkpoint_every, fingerprint={
                      "loop": "fit", "batch_size": batch_size, "train_shape": list(train_data.shape),
                      "config": fingerprint or {}})
    state = parallel.replicate(state, mesh)
    restored, meta = log.begin({"state": state, "epoch_key": state.key}, resume=resume, after_restore=after_restore)
    data = parallel.replicate(train_data, mesh)
    epoch, start_batch, epoch_key, done = 0, 0, None, None
    if restored is not None:
        state, epoch_key = restored["state"], restored["epoch_key"]
        epoch, start_batch = int(meta["epoch"]), int(meta["batch"])
        done = _unpack_partial(meta.get("partial"), mesh)
    step = int(state.step)

    def record(ep: int, train_metrics: dict[str, float] | None) -> dict[str, Any]:
        rec: dict[str, Any] = {"epoch": ep, "step": int(state.step), "seconds": log.seconds()}
        if train_metrics:
            rec.update({f"train_{k}": v for k, v in train_metrics.items()})
        if evaluate is not None:
            # The same evaluation key every time, so successive test numbers differ only through the parameters.
            rec.update({f"test_{k}": v for k, v in evaluate(state.params, test_data, eval_key).items()})
        log.append(rec)
        if checkpoint_path is not None and log.writer:
            save_params(checkpoint_path, state.params)
        return rec

    if restored is None:
        record(0, None)
        log.save(step, {"state": state, "epoch_key": state.key}, epoch=0)
    bar = tqdm(range(epoch + 1, epochs + 1), desc="train", disable=not progress, unit="epoch", initial=epoch,
               total=epochs)
    try:
        for ep in bar:
            epoch_start_step = step - start_batch
            if scan and start_batch == 0:
                state, means, health = engine.scan_epoch(state, data)
            else:
                this_epoch_key = state.key if start_batch == 0 else epoch_key

                def after_step(i: int, st: TrainState, collected: Callable[[], Any], ep: int = ep,
                               first: int = epoch_start_step, ek: Any = this_epoch_key) -> None:
                    s = first + i + 1
                    if log.every is None or s % log.every or i == num_batches - 1:
                        return
                    ms, fs = collected()
                    h = jax.device_get(engine.reduce(ms, fs)[1])
                    if h["first_bad"] >= 0 and not skip_nonfinite:
                        raise FloatingPointError(_nonfinite_message(
                            epoch=ep, step=first + int(h["first_bad"]) + 1, batch=int(h["first_bad"]) + 1,
                            num_batches=num_batches, flags=h["flags"], log=log))
                    log.save(s, {"state": st, "epoch_key": ek}, epoch=ep - 1, batch=i + 1,
                             partial=_pack_partial(ms, fs))

                state, means, health = engine.stepped_epoch(
                    state, data, start=start_batch, epoch_key=epoch_key if start_batch else None, done=done,
                    after_step=after_step if log.ckpt is not None else None)
            step = epoch_start_step + num_batches
            start_batch, epoch_key, done = 0, None, None
            health = jax.device_get(health)
            first_bad = int(health["first_bad"])
            if first_bad >= 0 and not skip_nonfinite:
                raise FloatingPointError(_nonfinite_message(
                    epoch=ep, step=epoch_start_step + first_bad + 1, batch=first_bad + 1, num_batches=num_batches,
                    flags=health["flags"], log=log))
            if skip_nonfinite and int(health["bad_steps"]) == num_batches:
                raise FloatingPointError(f"every update of epoch {ep} (steps {epoch_start_step + 1}-{step}) had a "
                                         f"non-finite loss term or gradient and was skipped; {log.kept()}; lower "
                                         "the learning rate")
            last_train = {k: float(v) for k, v in jax.device_get(means).items()}
            if skip_nonfinite:
                last_train["skipped_steps"] = int(health["bad_steps"])
            out_of_time = time_limit is not None and log.seconds() - log.elapsed0 > time_limit
            evaluated = ep % eval_every == 0 or ep == epochs or out_of_time
            if evaluated:
                rec = record(ep, last_train)
                shown = {k: v for k, v in rec.items() if k in ("train_loss", "test_loss")}
                bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            else:
                bar.set_postfix(train_loss=f"{last_train.get('loss', float('nan')):.3f}")
            if log.due(step, evaluated=evaluated) or ep == epochs or out_of_time:
                log.save(step, {"state": state, "epoch_key": state.key}, epoch=ep)
            if out_of_time:
                break
    finally:
        bar.close()
        log.close()
    return state, log.history


def stack_metrics(history: list[dict[str, Any]], key: str) -> np.ndarray:
    """One metric across the history records that have it."""
    return np.array([h[key] for h in history if key in h])


# ------------------------------------------------------------------------------------------------------------
# Independent restarts, trained side by side with vmap, the best kept
# ------------------------------------------------------------------------------------------------------------


def _restart_scorer(batch_value: Callable[[Params, jax.Array, jax.Array], jax.Array], *, batch_size: int,
                    repeats: int = 1) -> Callable:
    """``score(params, data, key) -> (R,) array``: ``batch_value(params, batch, key)`` averaged over the batches
    of ``data`` (the remainder smaller than one batch left out) and ``repeats`` draws, jitted and vmapped over a
    leading restart axis of ``params``."""

    def one(params: Params, batches: jax.Array, key: jax.Array) -> jax.Array:
        keys = jax.random.split(key, repeats * batches.shape[0])
        tiled = jnp.concatenate([batches] * repeats)
        return jnp.mean(jax.lax.map(lambda kb: batch_value(params, kb[1], kb[0]), (keys, tiled)))

    batched = jax.jit(jax.vmap(one, in_axes=(0, None, None)))

    def score(params: Params, data: jax.Array, key: jax.Array) -> np.ndarray:
        bs = min(batch_size, data.shape[0])
        nb = data.shape[0] // bs
        return np.asarray(batched(params, jnp.asarray(data[: nb * bs]).reshape((nb, bs) + data.shape[1:]), key))

    return score


def make_scorer(model: Any, *, num_samples: int = 50, batch_size: int = 500) -> Callable:
    """``score(params, data, key)``: mean importance-sampled log p(x) over ``data`` (K = ``num_samples``) for each
    restart (leading axis of ``params``)."""

    def batch_log_px(params: Params, batch: jax.Array, key: jax.Array) -> jax.Array:
        if hasattr(model, "with_stats"):  # a batch-normalised encoder: the batch's statistics
            params = model.with_stats(params, batch)
        keys = jax.random.split(key, batch.shape[0])
        log_w = jax.vmap(lambda x, k: model.log_weights(params, x, k, num_samples))(batch, keys)
        return jnp.mean(jax.nn.logsumexp(log_w, axis=-1) - math.log(num_samples))

    return _restart_scorer(batch_log_px, batch_size=batch_size)


def make_objective_scorer(loss_fn: LossFn, *, batch_size: int = 1000, repeats: int = 4) -> Callable:
    """``score(params, data, key)``: minus the training loss averaged over the batches of ``data`` and ``repeats``
    Monte-Carlo draws, for each restart (leading axis of ``params``)."""
    return _restart_scorer(lambda p, b, k: -loss_fn(p, b, k, jnp.asarray(EVAL_STEP))[0], batch_size=batch_size,
                           repeats=repeats)


SELECTION_CRITERIA = ("objective", "log_px")


def fit_restarts(
    model: Any,
    train_data: Any,
    *,
    init_fn: Callable[[jax.Array], Params],
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    restarts: int,
    batch_size: int,
    epochs: int,
    test_data: Any | None = None,
    eval_loss_fn: LossFn | None = None,
    eval_every: int = 1,
    metrics_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
    progress: bool = True,
    select: str = "objective",
    score_samples: int = 50,
    score_examples: int = 10_000,
    keep_all: bool = False,
    mesh: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    resume: bool = False,
    skip_nonfinite: bool = False,
    fingerprint: dict[str, Any] | None = None,
    after_restore: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TrainState, list[dict[str, Any]], dict[str, Any]]:
    """Train ``restarts`` independent initialisations at once (``vmap`` of :func:`epoch_fn`), then keep the best,
    like the ``n_init`` of k-means or a Gaussian mixture: nothing but the model's own fit to the data decides.

    ``select="objective"`` keeps the restart with the best training objective (minus ``loss_fn``) over the training
    set (its first ``score_examples`` rows); ``"log_px"`` the one with the best importance-sampled log-likelihood
    (K = ``score_samples``). Both are computed and recorded (not at all for a single restart). Returns the chosen restart's state, its history (records as :func:`fit`
    writes them) and the selection record (with ``keep_all``, it also holds every restart's parameters under
    ``"all_params"``, stacked on a leading axis). ``metrics_path`` receives one record per evaluation with a value
    per restart.

    ``mesh``, ``checkpoint_dir``, ``checkpoint_every``, ``keep_checkpoints``, ``resume``, ``skip_nonfinite``,
    ``fingerprint`` and ``after_restore`` work as in :func:`fit` (checkpoints at the ends of epochs; a non-finite step in any restart
    stops the run, naming the restart).
    """
    if select not in SELECTION_CRITERIA:
        raise ValueError(f"unknown selection criterion {select!r}; choose one of {', '.join(SELECTION_CRITERIA)}")
    train_data = _as_host_or_device(train_data)
    batch_size = check_batch_size(batch_size, train_data.shape[0])
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
    eval_every = max(1, int(eval_every))
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_divisible(batch_size, mesh)
    _check_microbatch(loss_fn, mesh, batch_size)
    num_batches = train_data.shape[0] // batch_size
    keys = jax.random.split(key, restarts)
    states = jax.vmap(lambda k: init_state(init_fn(jax.random.fold_in(k, 0)), optimizer, jax.random.fold_in(k, 1)))(
        keys)
    epoch = jax.jit(jax.vmap(_epoch_with_health(loss_fn, optimizer, batch_size=batch_size, mesh=mesh,
                                                skip_nonfinite=skip_nonfinite), in_axes=(0, None)),
                    donate_argnums=0, **_jit_kwargs(mesh, batch_leading=None))
    eval_fn = eval_loss_fn or loss_fn
    evaluate = None
    if test_data is not None:
        test_data = parallel.replicate(_as_host_or_device(test_data), mesh)
        split_test = test_data.shape[0] % parallel.num_shards(mesh) == 0

        @jax.jit
        def evaluate(params: Params, x: jax.Array, k: jax.Array) -> Metrics:
            if split_test:
                x = parallel.constrain_batch(x, mesh)
            return jax.vmap(lambda p: eval_fn(p, x, k, jnp.asarray(EVAL_STEP))[1])(params)

    eval_key = parallel.replicate(jax.random.fold_in(key, 10**6), mesh)
    log = _RunLog(metrics_path=metrics_path, checkpoint_dir=checkpoint_dir, keep=keep_checkpoints,
                  every=checkpoint_every, fingerprint={
                      "loop": "fit_restarts", "restarts": int(restarts), "batch_size": batch_size,
                      "train_shape": list(train_data.shape), "config": fingerprint or {}})
    states = parallel.replicate(states, mesh)
    restored, meta = log.begin({"state": states}, resume=resume, after_restore=after_restore)
    data = parallel.replicate(train_data, mesh)
    start_epoch = 0
    if restored is not None:
        states, start_epoch = restored["state"], int(meta["epoch"])
    step = int(jax.device_get(states.step)[0])  # (host-side indexing: no compilation for a one-off op)

    def record(ep: int, train_metrics: dict[str, np.ndarray] | None) -> None:
        rec: dict[str, Any] = {"epoch": ep, "step": int(jax.device_get(states.step)[0]), "seconds": log.seconds()}
        if train_metrics:
            rec.update({f"train_{k}": np.asarray(v).tolist() for k, v in train_metrics.items()})
        if evaluate is not None:
            rec.update({f"test_{k}": np.asarray(v).tolist()
                        for k, v in jax.device_get(evaluate(states.params, test_data, eval_key)).items()})
        log.append(rec)

    if restored is None:
        record(0, None)
        log.save(step, {"state": states}, epoch=0)
    bar = tqdm(range(start_epoch + 1, epochs + 1), desc=f"train x{restarts}", disable=not progress, unit="epoch",
               initial=start_epoch, total=epochs)
    try:
        for ep in bar:
            states, metrics, health = epoch(states, data)
            epoch_start_step, step = step, step + num_batches
            health = jax.device_get(health)
            bad = np.nonzero(np.asarray(health["first_bad"]) >= 0)[0]
            if bad.size and not skip_nonfinite:
                r = int(bad[0])
                first_bad = int(health["first_bad"][r])
                raise FloatingPointError(_nonfinite_message(
                    epoch=ep, step=epoch_start_step + first_bad + 1, batch=first_bad + 1, num_batches=num_batches,
                    flags=jax.tree.map(lambda a: a[r], health["flags"]), log=log, restart=r))
            all_skipped = np.nonzero(np.asarray(health["bad_steps"]) == num_batches)[0]
            if skip_nonfinite and all_skipped.size:
                raise FloatingPointError(f"every update of epoch {ep} in restart(s) {all_skipped.tolist()} had a "
                                         f"non-finite loss term or gradient and was skipped; {log.kept()}; lower "
                                         "the learning rate")
            out_of_time = time_limit is not None and log.seconds() - log.elapsed0 > time_limit
            evaluated = ep % eval_every == 0 or ep == epochs or out_of_time
            if evaluated:
                train_metrics = dict(jax.device_get(metrics))
                if skip_nonfinite:
                    train_metrics["skipped_steps"] = np.asarray(health["bad_steps"])
                record(ep, train_metrics)
                bar.set_postfix(best_train_loss=f"{float(np.nanmin(train_metrics['loss'])):.3f}")
            if log.due(step, evaluated=evaluated) or ep == epochs or out_of_time:
                log.save(step, {"state": states}, epoch=ep)
            if out_of_time:
                break
    finally:
        bar.close()
        log.close()
    history = log.history
    scored = train_data[:score_examples]
    if restarts > 1:
        log_px = make_scorer(model, num_samples=score_samples)(states.params, scored, jax.random.fold_in(key, 7))
        objective = make_objective_scorer(loss_fn)(states.params, scored, jax.random.fold_in(key, 8))
    else:  # nothing to choose between
        log_px = objective = np.full((1,), np.nan)
    scores = {"objective": objective, "log_px": log_px}[select]
    best = int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
    chosen = jax.jit(lambda s, i: jax.tree.map(lambda a: a[i], s))(states, best)  # one compilation, not one a leaf
    reduced = [{k: (v[best] if isinstance(v, list) else v) for k, v in rec.items()} for rec in history]
    selection = {"restarts": int(restarts), "select": select, "chosen": best,
                 "train_objective": [float(v) if np.isfinite(v) else None for v in objective],
                 "train_log_px": [float(v) if np.isfinite(v) else None for v in log_px],
                 "score_samples": int(score_samples), "seconds": log.seconds()}
    log.append({"selection": selection}, history=False)
    if keep_all:
        selection["all_params"] = states.params
    return chosen, reduced, selection
