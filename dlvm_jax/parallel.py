r"""Data parallelism with JAX's own SPMD sharding: one code path for 1..N devices, on one host or many.

A :class:`jax.sharding.Mesh` with one axis, ``"data"``, spans the devices. Batches are split along their first
axis over that axis (``PartitionSpec("data")``); parameters, optimizer state, PRNG keys and the (small) data sets
are replicated (``PartitionSpec()``). The jitted train step and the importance-sampled evaluation are ordinary
functions of global arrays: XLA partitions them and inserts the all-reduce of the batch-mean loss and its
gradient. Nothing here communicates by hand, and there is no ``pmap``.

Every number is the same function of the global batch and key whatever the device count (per-example keys come
from ``jax.random.split`` of the global key over the global batch), so a run on 8 devices follows the run on 1
device up to the order of floating-point sums.

Multi-host: call ``jax.distributed.initialize()`` at the start of every process (see the README); ``jax.devices()``
then lists every process's devices, :func:`make_mesh` spans them all, and every process must load the same data.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A one-axis (``"data"``) mesh over ``devices`` (default: the first ``num_devices`` of ``jax.devices()``,
    all of them when ``num_devices`` is None; with several processes, every process's devices)."""
    available = list(jax.devices()) if devices is None else list(devices)
    if num_devices is None:
        num_devices = len(available)
    if int(num_devices) != num_devices or not 1 <= num_devices <= len(available):
        raise ValueError(f"the number of devices must be an integer from 1 to {len(available)} (the devices JAX "
                         f"sees: {len(available)} x {available[0].platform}), got {num_devices}")
    return Mesh(np.array(available[: int(num_devices)]), (DATA_AXIS,))


def num_shards(mesh: Mesh) -> int:
    """How many pieces a batch is cut into."""
    return int(mesh.shape[DATA_AXIS])


def batch_sharding(mesh: Mesh, *, leading: int = 0) -> NamedSharding:
    """Arrays split along axis ``leading`` over the data axis (``leading=1`` for a stack of batches)."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays copied whole onto every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch_size: int, mesh: Mesh, *, option: str = "--batch-size") -> int:
    """``batch_size`` unchanged if the devices of ``mesh`` share it evenly; else a one-line error naming a fix."""
    n = num_shards(mesh)
    if batch_size % n:
        lower, upper = (batch_size // n) * n, -(-batch_size // n) * n
        sizes = " or ".join(f"{option} {b}" for b in (lower, upper) if b >= 1)
        raise ValueError(f"batch size {batch_size} cannot be split evenly over {n} devices; use {sizes}, "
                         "or fewer devices (--devices)")
    return batch_size


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    # Several processes: build the global array from this process's (identical) copy, piece by piece.
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = np.asarray(jax.random.key_data(x))
        raw = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
        return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` replicated over ``mesh``."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: _put(a, sharding), tree)


def shard_batch(batch: Any, mesh: Mesh) -> jax.Array:
    """``batch`` split along its first axis over the devices of ``mesh`` (which must divide it)."""
    check_divisible(int(np.shape(batch)[0]), mesh)
    return _put(batch, batch_sharding(mesh))


def constrain_batch(x: jax.Array, mesh: Mesh | None, *, leading: int = 0) -> jax.Array:
    """Inside jitted code: ask XLA to keep ``x`` split along axis ``leading`` over the data axis."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, leading=leading))


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly split) global array as one host array on every process."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def describe(mesh: Mesh) -> str:
    """``"8 cpu devices"``, ``"1 gpu device"``."""
    n = num_shards(mesh)
    platform = mesh.devices.flat[0].platform
    return f"{n} {platform} device{'s' if n != 1 else ''}" + (
        f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")


# ------------------------------------------------------------------------------------------------------------
# Importance-sampled log-likelihood with the batch split over the devices
# ------------------------------------------------------------------------------------------------------------


def log_likelihood(
    model: Any,
    params: Any,
    data: Any,
    key: jax.Array,
    *,
    mesh: Mesh | None = None,
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
    progress: bool = True,
    **estimator_options: Any,
) -> Any:
    """:func:`dlvm_jax.likelihood.log_likelihood` with each batch split over the devices of ``mesh`` (default:
    all devices) and the parameters replicated. Batch ``i`` uses ``fold_in(key, i)`` and example ``j`` of a
    batch ``split(key_i, batch_size)[j]``, as on one device; ``batch_size`` is rounded up to a multiple of the
    device count (the last batch is padded and the padding dropped). Returns an
    :class:`~dlvm_jax.likelihood.ISEstimate` of per-example host arrays. ``estimator_options`` go to
    :func:`~dlvm_jax.likelihood.make_batch_estimator`."""
    from dlvm_jax import likelihood
    from dlvm_jax.objectives import check_num_samples

    mesh = make_mesh() if mesh is None else mesh
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[0]
    if n == 0:
        raise ValueError("log_likelihood got an empty dataset")
    shards = num_shards(mesh)
    batch_size = min(check_num_samples(batch_size, "batch_size"), n)
    batch_size = -(-batch_size // shards) * shards
    estimate = likelihood.make_batch_estimator(model, num_samples=num_samples, chunk_size=chunk_size,
                                               **estimator_options)
    params = replicate(params, mesh)
    key = replicate(key, mesh)
    sharding = batch_sharding(mesh)
    parts = []
    num_batches = -(-n // batch_size)
    for i in tqdm(range(num_batches), desc=f"log p(x), K={num_samples}", disable=not progress, leave=False):
        batch = data[i * batch_size:(i + 1) * batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        out = estimate(params, _put(batch, sharding), jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda a, r=real: _gather(a)[:r], out))
    return likelihood.ISEstimate(*(jnp.asarray(np.concatenate(field)) for field in zip(*parts)))
