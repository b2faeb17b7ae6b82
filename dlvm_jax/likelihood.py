r"""Importance-sampled marginal log-likelihood.

    log p(x) ~= log (1/K) sum_k w_k,   w_k = p(x, z_k) / q(z_k | x),  z_k ~ q(z | x)

Per example the K log-weights are drawn in chunks (``lax.map`` over chunks, ``vmap`` over the batch inside), so
memory is bounded by ``batch_size * chunk_size`` whatever K and the dataset size. With the normalised weights
v_k = w_k / max w, the Monte-Carlo standard error of the estimate is (delta method)
sd(v) / (sqrt(K) mean(v)), and the effective sample size is (sum v)^2 / sum v^2.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dlvm_jax.objectives import check_num_samples

Params = Any


class ISEstimate(NamedTuple):
    """Per-example results of :func:`log_likelihood` (arrays of shape (N,))."""

    log_px: jax.Array  #: importance-sampled log p(x)
    stderr: jax.Array  #: Monte-Carlo standard error of log_px (delta method)
    elbo: jax.Array  #: mean log-weight: the ELBO estimated on the same samples
    ess: jax.Array  #: effective sample size of the K importance weights

    def summary(self) -> dict[str, float]:
        """Dataset means, with the standard error of the mean log p(x) over examples."""
        n = self.log_px.shape[0]
        return {
            "log_px": float(jnp.mean(self.log_px)),
            "log_px_se_over_data": float(jnp.std(self.log_px) / math.sqrt(max(n, 1))),
            "log_px_mc_se": float(jnp.sqrt(jnp.sum(jnp.square(self.stderr))) / max(n, 1)),
            "elbo": float(jnp.mean(self.elbo)),
            "ess_mean": float(jnp.mean(self.ess)),
            "num_examples": int(n),
        }


def weight_statistics(log_w: jax.Array) -> ISEstimate:
    """IS estimate, its standard error, ELBO and ESS from the log-weights of one example (last axis = K)."""
    k = log_w.shape[-1]
    top = jnp.max(log_w, axis=-1, keepdims=True)
    v = jnp.exp(log_w - top)
    mean_v = jnp.mean(v, axis=-1)
    log_px = jnp.log(mean_v) + top[..., 0]
    stderr = jnp.std(v, axis=-1) / (math.sqrt(k) * mean_v)
    ess = jnp.square(jnp.sum(v, axis=-1)) / jnp.sum(jnp.square(v), axis=-1)
    return ISEstimate(log_px, stderr, jnp.mean(log_w, axis=-1), ess)


def chunked_log_weights(model: Any, params: Params, x: jax.Array, key: jax.Array, num_samples: int,
                        chunk_size: int) -> jax.Array:
    """All K log-weights of one example, drawn ``chunk_size`` at a time; shape (num_samples,)."""
    chunk = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    keys = jax.random.split(key, num_chunks)
    log_w = jax.lax.map(lambda k: model.log_weights(params, x, k, chunk), keys)
    return log_w.reshape(-1)[:num_samples]


def make_batch_estimator(model: Any, *, num_samples: int = 5000, chunk_size: int = 500):
    """Jitted ``estimate(params, batch, key) -> ISEstimate`` for one batch (one key per example from ``key``)."""
    num_samples = check_num_samples(num_samples)
    chunk_size = check_num_samples(chunk_size, "chunk_size")

    @jax.jit
    def estimate(params: Params, batch: jax.Array, key: jax.Array) -> ISEstimate:
        keys = jax.random.split(key, batch.shape[0])
        log_w = jax.vmap(lambda x, k: chunked_log_weights(model, params, x, k, num_samples, chunk_size))(
            batch, keys)
        return weight_statistics(log_w)

    return estimate


def log_likelihood(
    model: Any,
    params: Params,
    data: Any,
    key: jax.Array,
    *,
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
    progress: bool = True,
) -> ISEstimate:
    """Importance-sampled log p(x) of every row of ``data`` with K = ``num_samples`` samples from q(z | x).

    Batch ``i`` uses the key ``fold_in(key, i)``; the last batch is padded and the padding dropped.
    """
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[0]
    if n == 0:
        raise ValueError("log_likelihood got an empty dataset")
    batch_size = min(check_num_samples(batch_size, "batch_size"), n)
    estimate = make_batch_estimator(model, num_samples=num_samples, chunk_size=chunk_size)
    parts = []
    num_batches = -(-n // batch_size)
    for i in tqdm(range(num_batches), desc=f"log p(x), K={num_samples}", disable=not progress, leave=False):
        batch = data[i * batch_size:(i + 1) * batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        out = estimate(params, jnp.asarray(batch), jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda a, r=real: a[:r], out))
    return ISEstimate(*(jnp.concatenate(field) for field in zip(*parts)))
