r"""Importance-sampled marginal log-likelihood.

    log p(x) ~= log (1/K) sum_k w_k,   w_k = p(x, z_k) / q(z_k | x),  z_k ~ q(z | x)

Per example the K log-weights are drawn in chunks (``lax.map`` over chunks, ``vmap`` over the batch inside), so
memory is bounded by ``batch_size * chunk_size`` whatever K and the dataset size. With the normalised weights
v_k = w_k / max w, the Monte-Carlo standard error of the estimate is (delta method)
sd(v) / (sqrt(K) mean(v)), and the effective sample size is (sum v)^2 / sum v^2.

``proposal="prior"`` gives the naive Monte-Carlo estimate instead: z_k ~ p(z) and w_k = p(x | z_k), unbiased for
p(x) like the importance-sampled one, but with a weight variance that grows with how much narrower p(z | x) is than
p(z) (for MNIST, hopelessly: see experiments/diagnostics_sampling.py).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dlvm_jax.objectives import check_num_samples
from dlvm_jax.runtime import tuned_jit

Params = Any
#: Where the samples of z come from: the model's amortised q(z | x) (importance sampling) or the prior (naive MC).
PROPOSALS = ("q", "prior")


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


def check_proposal(proposal: str) -> str:
    if proposal not in PROPOSALS:
        raise ValueError(f"unknown proposal {proposal!r}; choose one of {', '.join(PROPOSALS)}")
    return proposal


def prior_log_weights(model: Any, params: Params, x: jax.Array, key: jax.Array, num_samples: int) -> jax.Array:
    """Naive Monte-Carlo log-weights of one example: log w_k = log p(x | z_k), z_k ~ p(z); shape (num_samples,)."""
    z = model.prior(params).sample(seed=key, sample_shape=num_samples)
    return model.decode(params, z).log_prob(x)


def proposal_log_weights(model: Any, params: Params, x: jax.Array, proposal: Any, key: jax.Array,
                         num_samples: int) -> jax.Array:
    """log w_k = log p(x | z_k) + log p(z_k) - log r(z_k), z_k ~ r, for any distribution r over z (one example)."""
    z = proposal.sample(seed=key, sample_shape=num_samples)
    return model.decode(params, z).log_prob(x) + model.prior(params).log_prob(z) - proposal.log_prob(z)


def chunked(draw: Callable[[jax.Array, int], jax.Array], key: jax.Array, num_samples: int,
            chunk_size: int) -> jax.Array:
    """``num_samples`` values of ``draw(key, n) -> (n,)``, drawn ``chunk_size`` at a time (``lax.map`` over chunks,
    one key each, the last chunk cut); shape (num_samples,)."""
    chunk = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    keys = jax.random.split(key, num_chunks)
    return jax.lax.map(lambda k: draw(k, chunk), keys).reshape(-1)[:num_samples]


def chunked_log_weights(model: Any, params: Params, x: jax.Array, key: jax.Array, num_samples: int,
                        chunk_size: int, *, proposal: str = "q") -> jax.Array:
    """All K log-weights of one example, drawn ``chunk_size`` at a time; shape (num_samples,). ``proposal="q"``:
    z ~ q(z | x) (:meth:`log_weights` of the model); ``"prior"``: z ~ p(z) (:func:`prior_log_weights`)."""
    if check_proposal(proposal) == "prior":
        return chunked(lambda k, n: prior_log_weights(model, params, x, k, n), key, num_samples, chunk_size)
    return chunked(lambda k, n: model.log_weights(params, x, k, n), key, num_samples, chunk_size)


def make_batch_estimator(model: Any, *, num_samples: int = 5000, chunk_size: int = 500, proposal: str = "q"):
    """Jitted ``estimate(params, batch, key) -> ISEstimate`` for one batch (one key per example from ``key``). On a
    CPU its first call picks the faster library for the decoder's matrix products (:class:`dlvm_jax.runtime.tuned_jit`;
    the MLP VAE's K = 5000 estimate of 100 images ran 1.145x faster with Eigen's than with YNNPACK's in
    ``python -m benchmarks.profile_dots``)."""
    num_samples = check_num_samples(num_samples)
    chunk_size = check_num_samples(chunk_size, "chunk_size")
    check_proposal(proposal)

    @tuned_jit
    def estimate(params: Params, batch: jax.Array, key: jax.Array) -> ISEstimate:
        keys = jax.random.split(key, batch.shape[0])
        log_w = jax.vmap(lambda x, k: chunked_log_weights(model, params, x, k, num_samples, chunk_size,
                                                          proposal=proposal))(batch, keys)
        return weight_statistics(log_w)

    return estimate


def block_estimates(log_w: jax.Array, k: int) -> jax.Array:
    """Estimates log (1/k) sum w over the disjoint blocks of ``k`` consecutive log-weights (last axis; a remainder
    shorter than ``k`` is left out): shape (..., len // k). Independent replicates of the K = k estimate from one
    long run of weights."""
    k = check_num_samples(k, "k")
    n = log_w.shape[-1] // k
    if n == 0:
        raise ValueError(f"block size k = {k} is larger than the {log_w.shape[-1]} log-weights")
    blocks = log_w[..., : n * k].reshape(log_w.shape[:-1] + (n, k))
    return jax.nn.logsumexp(blocks, axis=-1) - math.log(k)


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
    proposal: str = "q",
) -> ISEstimate:
    """Importance-sampled log p(x) of every row of ``data`` with K = ``num_samples`` samples from q(z | x)
    (``proposal="prior"``: the naive Monte-Carlo estimate with K samples from p(z); ESS and standard error then
    describe the weights p(x | z_k)).

    Batch ``i`` uses the key ``fold_in(key, i)``; the last batch is padded and the padding dropped.
    """
    data = np.asarray(data, dtype=np.float32)
    n = data.shape[0]
    if n == 0:
        raise ValueError("log_likelihood got an empty dataset")
    batch_size = min(check_num_samples(batch_size, "batch_size"), n)
    estimate = make_batch_estimator(model, num_samples=num_samples, chunk_size=chunk_size, proposal=proposal)
    parts = []
    num_batches = -(-n // batch_size)
    label = "log p(x)" if proposal == "q" else "naive log p(x)"
    for i in tqdm(range(num_batches), desc=f"{label}, K={num_samples}", disable=not progress, leave=False):
        batch = data[i * batch_size:(i + 1) * batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        out = estimate(params, jnp.asarray(batch), jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda a, r=real: a[:r], out))
    return ISEstimate(*(jnp.concatenate(field) for field in zip(*parts)))
