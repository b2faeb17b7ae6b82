r"""Variational objectives, written per example and lifted with ``jax.vmap`` over the batch.

With log-weights log w_m = log p(x, z_m) - log q(z_m | x), z_m ~ q(z | x), m = 1..M:

* ELBO, Monte-Carlo KL:  (1/M) sum_m [log p(x | z_m) + beta (log p(z_m) - log q(z_m | x))]
* ELBO, analytic KL:     (1/M) sum_m log p(x | z_m) - beta KL(q(z | x) || p(z))
* IWAE (Burda et al. 2015):  log (1/K) sum_k w_k  =  logsumexp_k(log w_k) - log K

Gradient estimators of the ELBO with respect to q's parameters phi (``make_loss(estimator=...)``):

* ``"reparam"``: the pathwise gradient through z = g(phi, eps) (Kingma & Welling 2014).
* ``"stl"``: sticking the landing (Roeder et al. 2017): the pathwise gradient with log q's parameters held constant
  (the score term of log q, zero in expectation, is dropped); its variance vanishes when q = p(z | x).
* ``"score"``: the score-function (REINFORCE) estimator with a leave-one-out baseline (Kool et al. 2019; the
  baseline of VIMCO, Mnih & Rezende 2016, for the ELBO): with f_m = log p(x, z_m) - log q(z_m | x), z_m ~ q held
  constant,  grad_phi ~= (1/M) sum_m (f_m - b_m) grad_phi log q(z_m | x),  b_m = (1/(M-1)) sum_{j != m} f_j.
  b_m does not depend on z_m, so the estimator is unbiased; it needs M >= 2 samples. The decoder's gradient is
  (1/M) sum_m grad_theta log p(x | z_m), as in the other two.

A model is any object with ``encode``, ``decode``, ``prior`` and ``log_weights`` (see :mod:`dlvm_jax.models`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dlvm_jax import distributions as dists
from dlvm_jax import noise

Params = Any
Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Metrics]]
OBJECTIVES = ("elbo", "iwae")
ESTIMATORS = ("reparam", "stl", "score")


def check_num_samples(num_samples: int, name: str = "num_samples") -> int:
    if int(num_samples) != num_samples or num_samples < 1:
        raise ValueError(f"{name} (the number of Monte Carlo / importance samples K) must be an integer >= 1, "
                         f"got {num_samples}")
    return int(num_samples)


def elbo_terms(
    model: Any, params: Params, x: jax.Array, key: jax.Array, *, num_samples: int = 1, analytic_kl: bool = True,
    stop_q_grad: bool = False,
) -> Metrics:
    """Per-example ELBO pieces: ``rec`` = E_q log p(x|z), ``kl`` = KL(q||p) (analytic or MC), ``elbo`` = rec - kl.
    ``key``: a PRNG key, or the standard-normal noise of the samples (see :func:`dlvm_jax.distributions.sample`)."""
    q = model.encode(params, x)
    prior = model.prior(params)
    z = dists.sample(q, key, num_samples)
    # One sample: decode it without its sample axis. The same value; under vmap over a batch the decoder's matmuls then
    # see (B, D) instead of (B, 1, D), which XLA lays out without the transposes and copies of the singleton axis
    # (the MLP VAE's train step 1.05x faster, `python -m benchmarks.ab_commits --model mlp_vae`).
    rec = model.decode(params, z[0]).log_prob(x) if num_samples == 1 else jnp.mean(model.decode(params, z).log_prob(x))
    if analytic_kl:
        kl = dists.kl_divergence(q, prior)
    else:
        q_eval = model.encode(jax.lax.stop_gradient(params), x) if stop_q_grad else q
        kl = jnp.mean(q_eval.log_prob(z) - prior.log_prob(z))
    return {"elbo": rec - kl, "rec": rec, "kl": kl}


def elbo(model: Any, params: Params, x: jax.Array, key: jax.Array, *, num_samples: int = 1,
         analytic_kl: bool = True) -> jax.Array:
    """The evidence lower bound of one example."""
    return elbo_terms(model, params, x, key, num_samples=num_samples, analytic_kl=analytic_kl)["elbo"]


def iwae(model: Any, params: Params, x: jax.Array, key: jax.Array, *, num_samples: int,
         stop_q_grad: bool = False) -> jax.Array:
    """The importance-weighted bound of one example: logsumexp(log w) - log K."""
    log_w = model.log_weights(params, x, key, num_samples, stop_q_grad=stop_q_grad)
    return jax.nn.logsumexp(log_w) - math.log(num_samples)


def score_function_elbo(model: Any, params: Params, x: jax.Array, key: jax.Array, *, num_samples: int,
                        weight: jax.Array | float = 1.0) -> tuple[jax.Array, Metrics]:
    r"""Surrogate of the Monte-Carlo ELBO whose gradient is the score-function estimator with a leave-one-out
    baseline, and whose value is the ELBO estimate itself (one example).

    With z_m ~ q(z | x) held constant and f_m = log p(x | z_m) + weight (log p(z_m) - log q(z_m | x)):

        surrogate = (1/M) sum_m [ f_m + sg(f_m - b_m) (log q(z_m | x) - sg(log q(z_m | x))) ],

    where sg is ``stop_gradient``: the second term is 0 in value, and its gradient is the score term. ``f_m`` is
    evaluated with q's parameters held constant, so the gradient with respect to q's parameters is only the
    score term, and with respect to the decoder it is the mean of grad log p(x | z_m).
    """
    num_samples = check_num_samples(num_samples)
    if num_samples < 2:
        raise ValueError("the score-function estimator's leave-one-out baseline needs num_samples >= 2, "
                         f"got {num_samples}")
    q = model.encode(params, x)
    z = jax.lax.stop_gradient(dists.sample(q, key, num_samples))
    log_q = q.log_prob(z)
    log_q_const = jax.lax.stop_gradient(log_q)
    rec = model.decode(params, z).log_prob(x)
    kl = log_q_const - model.prior(params).log_prob(z)
    f = rec - weight * kl
    f_const = jax.lax.stop_gradient(f)
    baseline = (jnp.sum(f_const) - f_const) / (num_samples - 1)
    surrogate = jnp.mean(f + (f_const - baseline) * (log_q - log_q_const))
    return surrogate, {"elbo": jnp.mean(rec - kl), "rec": jnp.mean(rec), "kl": jnp.mean(kl)}


def kl_weight(step: jax.Array, *, beta: float = 1.0, warmup_steps: int = 0) -> jax.Array:
    """KL weight at ``step``: ``beta * min(1, step / warmup_steps)`` (linear warm-up), ``beta`` without warm-up."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def make_loss(
    model: Any,
    *,
    objective: str = "elbo",
    num_samples: int = 1,
    analytic_kl: bool = True,
    beta: float = 1.0,
    warmup_steps: int = 0,
    estimator: str = "reparam",
) -> LossFn:
    """Batch loss ``loss_fn(params, batch, key, step) -> (loss, metrics)``: minus the batch mean of the objective.

    ``objective`` is ``"elbo"`` or ``"iwae"``; ``estimator`` ``"stl"`` drops the score term of log q (Roeder et al.
    2017; with the MC-KL ELBO or IWAE); ``"score"`` is the score-function estimator with a leave-one-out baseline
    (:func:`score_function_elbo`; the MC-KL ELBO, ``num_samples >= 2``). The samples come from the batch's standard-normal noise, drawn at
    once, ``normal(key, (B, num_samples, latent_dim))``: example i gets its slice in place of a key (see
    :func:`dlvm_jax.distributions.sample`; q must be Gaussian). ``metrics`` always holds ``loss`` and ``elbo`` (or ``iwae``) batch means.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    num_samples = check_num_samples(num_samples)
    if beta < 0:
        raise ValueError(f"the KL weight beta must be >= 0, got {beta}")
    stl = estimator == "stl"
    score = estimator == "score"
    if score and objective != "elbo":
        raise ValueError("the score-function estimator is implemented for objective='elbo'; use estimator 'reparam' "
                         "or 'stl' with the IWAE objective")
    if score and num_samples < 2:
        raise ValueError("the score-function estimator's leave-one-out baseline needs num_samples >= 2, "
                         f"got {num_samples}")
    if (stl or score) and objective == "elbo" and analytic_kl:
        analytic_kl = False  # STL and the score function are defined on the Monte-Carlo form of log q

    def per_example(params: Params, x: jax.Array, key: jax.Array, weight: jax.Array) -> tuple[jax.Array, Metrics]:
        if objective == "iwae":
            value = iwae(model, params, x, key, num_samples=num_samples, stop_q_grad=stl)
            return value, {"iwae": value}
        if score:
            return score_function_elbo(model, params, x, key, num_samples=num_samples, weight=weight)
        terms = elbo_terms(model, params, x, key, num_samples=num_samples, analytic_kl=analytic_kl, stop_q_grad=stl)
        return terms["rec"] - weight * terms["kl"], terms

    def loss_fn(params: Params, batch: jax.Array, key: jax.Array, step: jax.Array) -> tuple[jax.Array, Metrics]:
        weight = kl_weight(step, beta=beta, warmup_steps=warmup_steps)
        # The whole batch's standard-normal noise in one draw, handed to each example in place of a key: one
        # hash of the counters per step instead of a key split and a batched draw (benchmarks/profile_small_ops.py),
        # and an unrolled one (dlvm_jax.noise: jax.random.normal's numbers without XLA:CPU's rolled loop).
        eps = noise.normal(key, (batch.shape[0], num_samples) + tuple(model.prior(params).event_shape))
        values, terms = jax.vmap(per_example, in_axes=(None, 0, 0, None))(params, batch, eps, weight)
        loss = -jnp.mean(values)
        metrics = {k: jnp.mean(v) for k, v in terms.items()}
        metrics["loss"] = loss
        if objective == "elbo":
            metrics["beta"] = weight
        return loss, metrics

    return loss_fn


class MicrobatchedLoss:
    """A batch loss whose train-step gradient is accumulated over microbatches of ``size`` examples: one
    ``lax.scan`` inside the step computes ``value_and_grad`` of ``loss_fn`` on each microbatch and averages the
    losses, metrics and gradients. For a loss that is a batch mean of per-example terms (:func:`make_loss`; not
    :func:`~dlvm_jax.models.gmvae.make_gmvae_loss`, whose free bits act on a batch mean) that is an estimate of the
    whole batch's gradient with the same expectation (microbatch ``i`` draws its noise from ``fold_in(key, i)``;
    a noiseless loss gives the same gradient), while the activations kept for the backward pass are those of one
    microbatch: they stay in the CPU's caches, and the step's temporaries are small enough for malloc to recycle
    instead of page-faulting them in at every step (``python -m benchmarks.profile_microbatch``).

    Microbatch ``i`` holds examples ``i, i + count, i + 2 count, ...`` (``count = batch / size``), so that under a
    device mesh each spans every device. :func:`value_and_grad`, and through it :mod:`dlvm_jax.train`'s steps,
    epochs and fit loops, accumulate; calling it (evaluation) calls ``loss_fn`` on the whole batch."""

    def __init__(self, loss_fn: LossFn, size: int) -> None:
        if isinstance(loss_fn, MicrobatchedLoss):
            raise ValueError("the loss is microbatched already")
        if int(size) != size or size < 1:
            raise ValueError(f"the microbatch size must be an integer >= 1, got {size}")
        self.loss_fn, self.size = loss_fn, int(size)

    def __repr__(self) -> str:
        return f"MicrobatchedLoss({self.loss_fn!r}, size={self.size})"

    def split(self, batch: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(microbatches, keys)``: (count, size, ...) strided microbatches of ``batch`` and one key for each."""
        n = batch.shape[0]
        if n % self.size:
            raise ValueError(f"a batch of {n} examples cannot be cut into microbatches of {self.size}; use a batch "
                             f"size that is a multiple of {self.size}, or a microbatch size that divides {n}")
        count = n // self.size
        microbatches = jnp.swapaxes(batch.reshape((self.size, count) + batch.shape[1:]), 0, 1)
        return microbatches, jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))

    def __call__(self, params: Params, batch: jax.Array, key: jax.Array, step: jax.Array) -> tuple[jax.Array, Metrics]:
        """``loss_fn`` on the whole batch (evaluation, any batch size): without a gradient there are no activations
        to keep, and the value has the same expectation."""
        return self.loss_fn(params, batch, key, step)

    def value_and_grad(self, params: Params, batch: jax.Array, key: jax.Array, step: jax.Array, *,
                       constrain: Callable[[jax.Array], jax.Array] = lambda b: b
                       ) -> tuple[tuple[jax.Array, Metrics], Params]:
        """``((loss, metrics), grads)`` as ``jax.value_and_grad(self, has_aux=True)`` would give them, accumulated
        in one ``lax.scan`` over the microbatches; ``constrain`` is applied to each microbatch (a sharding)."""
        microbatches, keys = self.split(batch, key)
        value_and_grad = jax.value_and_grad(self.loss_fn, has_aux=True)

        def body(total: Params, bk: tuple[jax.Array, jax.Array]) -> tuple[Params, tuple[jax.Array, Metrics]]:
            (loss, metrics), grads = value_and_grad(params, constrain(bk[0]), bk[1], step)
            return jax.tree.map(jnp.add, total, grads), (loss, metrics)

        total, (losses, metrics) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), (microbatches, keys))
        count = microbatches.shape[0]
        grads = jax.tree.map(lambda g: g / count, total)
        return (jnp.mean(losses), jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)), grads


def microbatched(loss_fn: LossFn, size: int) -> MicrobatchedLoss:
    """``loss_fn`` with its train-step gradient accumulated over microbatches of ``size`` examples (see
    :class:`MicrobatchedLoss`); for losses that are batch means of per-example terms."""
    return MicrobatchedLoss(loss_fn, size)


def value_and_grad(loss_fn: LossFn, params: Params, batch: jax.Array, key: jax.Array, step: jax.Array, *,
                   constrain: Callable[[jax.Array], jax.Array] = lambda b: b
                   ) -> tuple[tuple[jax.Array, Metrics], Params]:
    """``((loss, metrics), grads)`` of a batch loss with respect to ``params``; accumulated over microbatches for a
    :class:`MicrobatchedLoss`."""
    if isinstance(loss_fn, MicrobatchedLoss):
        return loss_fn.value_and_grad(params, batch, key, step, constrain=constrain)
    return jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, step)
