"""Jitted optax training: TrainState, a donated train step, whole epochs on device, a fit loop with a progress bar,
JSON-lines metrics and msgpack parameter files.

One step (jitted, state donated): ``key, step_key = split(state.key)``; ``value_and_grad`` of the loss;
``optimizer.update``; ``optax.apply_updates``. One epoch: a shuffled permutation of the device-resident data,
reshaped into batches, consumed by ``lax.scan`` of the step: no host synchronisation inside an epoch.
"""

from __future__ import annotations

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

from dlvm_jax.objectives import LossFn, Metrics

Params = Any


class TrainState(NamedTuple):
    """Everything that moves between steps."""

    params: Params
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array


def init_state(params: Params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    return TrainState(params, optimizer.init(params), key, jnp.zeros((), jnp.int32))


def _step(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState,
          batch: jax.Array) -> tuple[TrainState, Metrics]:
    key, step_key = jax.random.split(state.key)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_key, state.step)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, opt_state, key, state.step + 1), metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
    """Jitted ``step(state, batch) -> (state, metrics)``; the incoming state's buffers are donated."""
    return jax.jit(lambda state, batch: _step(loss_fn, optimizer, state, batch), donate_argnums=0)


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


def epoch_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int) -> Callable:
    """Unjitted ``epoch(state, data) -> (state, mean metrics)``: one pass over a random permutation of ``data``
    (the remainder that does not fill a batch is left out of this epoch), ``lax.scan`` over the batches.
    Compose it freely (``jax.vmap`` over independent restarts, ``jax.jit``); :func:`make_epoch` jits it."""

    def epoch(state: TrainState, data: jax.Array) -> tuple[TrainState, Metrics]:
        key, batches = shuffled_batches(state.key, data, batch_size)
        state, metrics = jax.lax.scan(lambda s, b: _step(loss_fn, optimizer, s, b), state._replace(key=key), batches)
        return state, jax.tree.map(jnp.mean, metrics)

    return epoch


def make_epoch(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int) -> Callable:
    """Jitted, state-donating :func:`epoch_fn`."""
    return jax.jit(epoch_fn(loss_fn, optimizer, batch_size=batch_size), donate_argnums=0)


def make_stepped_epoch(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int) -> Callable:
    """Same contract as :func:`make_epoch`, but one dispatch of the jitted, donated step per batch instead of one
    ``lax.scan``. Metrics stay on the device until the epoch ends (no host synchronisation per step). On XLA's CPU
    backend the gradients of convolutions can compile to much slower code inside a scan than in a standalone
    step (measured ~10x for :class:`~dlvm_jax.networks.ConvDecoder`), so ``fit(..., scan=False)`` uses this."""
    step = make_train_step(loss_fn, optimizer)

    shuffle = jax.jit(lambda key, data: shuffled_batches(key, data, batch_size))

    def epoch(state: TrainState, data: jax.Array) -> tuple[TrainState, Metrics]:
        key, batches = shuffle(state.key, data)
        state = state._replace(key=key)
        collected = []
        for i in range(batches.shape[0]):
            state, metrics = step(state, batches[i])
            collected.append(metrics)
        return state, jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *collected)

    return epoch


def make_evaluator(loss_fn: LossFn, *, batch_size: int) -> Callable:
    """``evaluate(params, data, key) -> metrics``: loss metrics averaged over every example of ``data``
    (full batches by ``lax.map`` in one jitted call, the remainder in a second one)."""

    @jax.jit
    def full_batches(params: Params, batches: jax.Array, key: jax.Array) -> Metrics:
        keys = jax.random.split(key, batches.shape[0])
        metrics = jax.lax.map(lambda kb: loss_fn(params, kb[1], kb[0], jnp.asarray(10**9))[1], (keys, batches))
        return jax.tree.map(jnp.mean, metrics)

    remainder = jax.jit(lambda params, batch, key: loss_fn(params, batch, key, jnp.asarray(10**9))[1])

    def evaluate(params: Params, data: jax.Array, key: jax.Array) -> dict[str, float]:
        n = data.shape[0]
        bs = min(batch_size, n)
        nb = n // bs
        k_full, k_rem = jax.random.split(key)
        out = full_batches(params, data[: nb * bs].reshape((nb, bs) + data.shape[1:]), k_full)
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
    """Write ``params`` as msgpack, atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(flax.serialization.to_bytes(jax.device_get(params)))
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
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train for ``epochs`` epochs (or until ``time_limit`` seconds). Returns the final state and the history.

    Test metrics (``eval_loss_fn``, default ``loss_fn``) are computed before training (epoch 0), every
    ``eval_every`` epochs and at the end; each record is appended to ``metrics_path`` (JSON lines) and the
    parameters are written to ``checkpoint_path`` after each evaluation. ``scan=False`` dispatches one jitted step
    per batch (:func:`make_stepped_epoch`) instead of scanning over the epoch; the two give the same parameters.
    """
    train_data = jnp.asarray(train_data)
    batch_size = check_batch_size(batch_size, train_data.shape[0])
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    eval_every = max(1, int(eval_every))
    epoch_fn = (make_epoch if scan else make_stepped_epoch)(loss_fn, optimizer, batch_size=batch_size)
    evaluate = None
    if test_data is not None:
        test_data = jnp.asarray(test_data)
        evaluate = make_evaluator(eval_loss_fn or loss_fn, batch_size=max(batch_size, 100))
    eval_key = jax.random.key(12345) if eval_key is None else eval_key
    history: list[dict[str, Any]] = []
    start = time.perf_counter()

    def record(epoch: int, train_metrics: dict[str, float] | None) -> dict[str, Any]:
        rec: dict[str, Any] = {"epoch": epoch, "step": int(state.step), "seconds": round(time.perf_counter() - start, 3)}
        if train_metrics:
            rec.update({f"train_{k}": v for k, v in train_metrics.items()})
        if evaluate is not None:
            # The same evaluation key every time, so successive test numbers differ only through the parameters.
            rec.update({f"test_{k}": v for k, v in evaluate(state.params, test_data, eval_key).items()})
        history.append(rec)
        if metrics_path is not None:
            append_jsonl(metrics_path, rec)
        if checkpoint_path is not None:
            save_params(checkpoint_path, state.params)
        return rec

    record(0, None)
    bar = tqdm(range(1, epochs + 1), desc="train", disable=not progress, unit="epoch")
    last_train: dict[str, float] = {}
    epoch = 0
    for epoch in bar:
        state, metrics = epoch_fn(state, train_data)
        last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(last_train.get("loss", 0.0)):
            bar.close()
            raise FloatingPointError(f"the training loss became non-finite in epoch {epoch} (step {int(state.step)}); "
                                     "lower the learning rate")
        out_of_time = time_limit is not None and time.perf_counter() - start > time_limit
        if epoch % eval_every == 0 or epoch == epochs or out_of_time:
            rec = record(epoch, last_train)
            shown = {k: v for k, v in rec.items() if k in ("train_loss", "test_loss")}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        else:
            bar.set_postfix(train_loss=f"{last_train['loss']:.3f}")
        if out_of_time:
            break
    bar.close()
    return state, history


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
        keys = jax.random.split(key, batch.shape[0])
        log_w = jax.vmap(lambda x, k: model.log_weights(params, x, k, num_samples))(batch, keys)
        return jnp.mean(jax.nn.logsumexp(log_w, axis=-1) - math.log(num_samples))

    return _restart_scorer(batch_log_px, batch_size=batch_size)


def make_objective_scorer(loss_fn: LossFn, *, batch_size: int = 1000, repeats: int = 4) -> Callable:
    """``score(params, data, key)``: minus the training loss averaged over the batches of ``data`` and ``repeats``
    Monte-Carlo draws, for each restart (leading axis of ``params``)."""
    return _restart_scorer(lambda p, b, k: -loss_fn(p, b, k, jnp.asarray(10**9))[0], batch_size=batch_size,
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
) -> tuple[TrainState, list[dict[str, Any]], dict[str, Any]]:
    """Train ``restarts`` independent initialisations at once (``vmap`` of :func:`epoch_fn`), then keep the best,
    like the ``n_init`` of k-means or a Gaussian mixture: nothing but the model's own fit to the data decides.

    ``select="objective"`` keeps the restart with the best training objective (minus ``loss_fn``) over the training
    set (its first ``score_examples`` rows); ``"log_px"`` the one with the best importance-sampled log-likelihood
    (K = ``score_samples``). Both are computed and recorded (not at all for a single restart). Returns the chosen restart's state, its history (records as :func:`fit`
    writes them) and the selection record (with ``keep_all``, it also holds every restart's parameters under
    ``"all_params"``, stacked on a leading axis). ``metrics_path`` receives one record per evaluation with a value
    per restart.
    """
    if select not in SELECTION_CRITERIA:
        raise ValueError(f"unknown selection criterion {select!r}; choose one of {', '.join(SELECTION_CRITERIA)}")
    train_data = jnp.asarray(train_data)
    batch_size = check_batch_size(batch_size, train_data.shape[0])
    if int(restarts) != restarts or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
    eval_every = max(1, int(eval_every))
    keys = jax.random.split(key, restarts)
    states = jax.vmap(lambda k: init_state(init_fn(jax.random.fold_in(k, 0)), optimizer, jax.random.fold_in(k, 1)))(
        keys)
    epoch = jax.jit(jax.vmap(epoch_fn(loss_fn, optimizer, batch_size=batch_size), in_axes=(0, None)),
                    donate_argnums=0)
    eval_fn = eval_loss_fn or loss_fn
    big = jnp.asarray(10**9)
    evaluate = None
    if test_data is not None:
        test_data = jnp.asarray(test_data)
        evaluate = jax.jit(jax.vmap(lambda p, k: eval_fn(p, test_data, k, big)[1], in_axes=(0, None)))
    eval_key = jax.random.fold_in(key, 10**6)
    history: list[dict[str, Any]] = []
    start = time.perf_counter()

    def record(ep: int, train_metrics: dict[str, np.ndarray] | None) -> None:
        rec: dict[str, Any] = {"epoch": ep, "step": int(states.step[0]),
                               "seconds": round(time.perf_counter() - start, 3)}
        if train_metrics:
            rec.update({f"train_{k}": np.asarray(v).tolist() for k, v in train_metrics.items()})
        if evaluate is not None:
            rec.update({f"test_{k}": np.asarray(v).tolist() for k, v in evaluate(states.params, eval_key).items()})
        history.append(rec)
        if metrics_path is not None:
            append_jsonl(metrics_path, rec)

    record(0, None)
    bar = tqdm(range(1, epochs + 1), desc=f"train x{restarts}", disable=not progress, unit="epoch")
    for ep in bar:
        states, metrics = epoch(states, train_data)
        out_of_time = time_limit is not None and time.perf_counter() - start > time_limit
        if ep % eval_every == 0 or ep == epochs or out_of_time:
            train_metrics = jax.device_get(metrics)
            if not np.all(np.isfinite(train_metrics["loss"])):
                bar.close()
                raise FloatingPointError(f"the training loss became non-finite by epoch {ep} in restart(s) "
                                         f"{np.nonzero(~np.isfinite(train_metrics['loss']))[0].tolist()}; "
                                         "lower the learning rate")
            record(ep, train_metrics)
            bar.set_postfix(best_train_loss=f"{float(np.min(train_metrics['loss'])):.3f}")
        if out_of_time:
            break
    bar.close()
    scored = train_data[:score_examples]
    if restarts > 1:
        log_px = make_scorer(model, num_samples=score_samples)(states.params, scored, jax.random.fold_in(key, 7))
        objective = make_objective_scorer(loss_fn)(states.params, scored, jax.random.fold_in(key, 8))
    else:  # nothing to choose between
        log_px = objective = np.full((1,), np.nan)
    scores = {"objective": objective, "log_px": log_px}[select]
    best = int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
    chosen = jax.tree.map(lambda a: a[best], states)
    reduced = [{k: (v[best] if isinstance(v, list) else v) for k, v in rec.items()} for rec in history]
    selection = {"restarts": int(restarts), "select": select, "chosen": best,
                 "train_objective": [float(v) if np.isfinite(v) else None for v in objective],
                 "train_log_px": [float(v) if np.isfinite(v) else None for v in log_px],
                 "score_samples": int(score_samples), "seconds": round(time.perf_counter() - start, 3)}
    if metrics_path is not None:
        append_jsonl(metrics_path, {"selection": selection})
    if keep_all:
        selection["all_params"] = states.params
    return chosen, reduced, selection
