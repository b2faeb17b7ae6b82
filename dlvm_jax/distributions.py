"""Likelihood families, priors and KL divergences.

This is the only module of dlvm_jax that imports distrax. Every distribution handed out is a distrax object
whose event shape is the whole data point (``Independent`` over the data dimensions), so that
``log_prob(x)`` returns one number per example.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import jax
import jax.numpy as jnp

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import distrax

Array = jax.Array
Distribution = distrax.Distribution
Likelihood = Literal["bernoulli", "gaussian", "continuous_bernoulli"]
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian", "continuous_bernoulli")

#: Smallest standard deviation a learned Gaussian scale can take (keeps log-densities finite).
MIN_SCALE = 1e-3

#: Reductions over a last axis at most this long are written as a chain of elementwise ops (see :func:`sum_last`).
SMALL_AXIS = 5


def sum_last(x: Array) -> Array:
    """Sum over the last axis; for an axis of at most :data:`SMALL_AXIS` entries, as ``x[..., 0] + x[..., 1] + ...``.

    The same numbers (up to float rounding order), but XLA's CPU backend runs a reduction over a very short last
    axis (the 2-D latents and data of the spiral GMVAE, its 5 clusters) several times slower than the elementwise
    chain, which fuses with the work that produced ``x``: ``python -m benchmarks.profile_small_ops`` measured, on
    200,000 rows, 2.4 ms against 0.6 ms for 2 entries and 2.8 against 1.2 for 5, but the reduction ahead from 8
    entries on."""
    n = x.shape[-1]
    if n == 0 or n > SMALL_AXIS:
        return jnp.sum(x, axis=-1)
    return functools.reduce(jnp.add, [x[..., i] for i in range(n)])


def logsumexp_last(x: Array) -> Array:
    """``jax.nn.logsumexp(x, axis=-1)``, with the max and the sum over a short last axis written elementwise (see
    :func:`sum_last`). Stable for any values, -inf entries included (all -inf gives -inf)."""
    n = x.shape[-1]
    if n == 0 or n > SMALL_AXIS:
        return jax.nn.logsumexp(x, axis=-1)
    top = functools.reduce(jnp.maximum, [x[..., i] for i in range(n)])
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    return top + jnp.log(sum_last(jnp.exp(x - top[..., None])))


def log_softmax_last(x: Array) -> Array:
    """``jax.nn.log_softmax(x, axis=-1)`` through :func:`logsumexp_last`."""
    return x - logsumexp_last(x)[..., None]


@jax.custom_jvp
def softplus(x: Array) -> Array:
    """log(1 + e^x) as max(x, 0) + log(1 + e^{-|x|}): stable for every x, with gradient sigmoid(x) (defined
    explicitly: the max and |x| forms alone would give 0 instead of 1/2 at x = 0).

    The same function as ``jax.nn.softplus`` (``logaddexp(x, 0)``) to float32 rounding (the tests: relative 1e-6
    plus 1.2e-7 absolute against float64; 1 + e^{-|x|} is rounded where ``log1p`` would not round it, which only
    shows for x << 0, where softplus(x) ~ e^x is below 1e-7), and faster on XLA's CPU backend, which runs ``log1p``
    slower than ``log``: on 10^6 values, 1.0-1.1 ms against 1.4-1.6 ms with ``log1p`` and 1.5-1.7 ms for
    ``jax.nn.softplus`` (``python -m benchmarks.profile_small_ops``). Inside the per-pixel likelihood sums
    ``jax.nn.softplus`` was slower still: 10,000 decoded MNIST samples' Bernoulli log-likelihood, decoder matmuls
    included, took 74 ms with it against 41 ms with the ``log1p`` form (``benchmarks/profile_is.py``)."""
    return jnp.maximum(x, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(x)))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return softplus(x), jax.nn.sigmoid(x) * t


def positive_scale(raw: Array, min_scale: float = MIN_SCALE) -> Array:
    """Map an unconstrained network output to a standard deviation: ``softplus(raw) + min_scale``."""
    return softplus(raw) + min_scale


class MultivariateNormalDiag(distrax.MultivariateNormalDiag):
    r"""distrax's diagonal Gaussian, with ``log_prob`` in closed form:
    :math:`-\tfrac12 \sum_d z_d^2 - \sum_d \log \sigma_d - \tfrac D2 \log 2\pi`, :math:`z = (x - \mu) / \sigma`,
    summed with :func:`sum_last` (distrax goes through its affine bijector and sums with ``jnp.sum``)."""

    def log_prob(self, value: Array) -> Array:
        scale = self.scale_diag
        z = (value - self.loc) / scale
        dim = z.shape[-1]
        return -0.5 * sum_last(jnp.square(z)) - sum_last(jnp.log(scale)) - 0.5 * dim * math.log(2 * math.pi)

    def __getitem__(self, index) -> "MultivariateNormalDiag":
        base = super().__getitem__(index)  # distrax's batch-index rules
        return MultivariateNormalDiag(base.loc, base.scale_diag)


def diag_gaussian(loc: Array, scale: Array) -> MultivariateNormalDiag:
    """Diagonal Gaussian over the last axis of ``loc``."""
    return MultivariateNormalDiag(loc, scale)


def diag_gaussian_from_raw(raw: Array, min_scale: float = MIN_SCALE) -> MultivariateNormalDiag:
    """Diagonal Gaussian from a network output ``raw = [loc, raw_scale]`` split on the last axis."""
    loc, raw_scale = jnp.split(raw, 2, axis=-1)
    return diag_gaussian(loc, positive_scale(raw_scale, min_scale))


def full_gaussian(loc: Array, scale_tril: Array) -> distrax.MultivariateNormalTri:
    """Gaussian with covariance ``scale_tril @ scale_tril.T`` (lower-triangular scale)."""
    return distrax.MultivariateNormalTri(loc, scale_tril)


def standard_normal(dim: int) -> MultivariateNormalDiag:
    """The prior N(0, I) in ``dim`` dimensions."""
    return MultivariateNormalDiag(jnp.zeros(dim), jnp.ones(dim))


def is_key(key: Array) -> bool:
    """Whether ``key`` is a PRNG key (typed, or a raw uint32 one) rather than an array of noise."""
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or key.dtype == jnp.uint32


def sample(q: Distribution, key: Array, num_samples: int) -> Array:
    """``num_samples`` reparameterised draws z ~ q, shape (num_samples, *event_shape).

    ``key`` is a PRNG key (then ``q.sample(seed=key, sample_shape=num_samples)``), or the standard-normal noise
    itself, an array eps of that shape: then z = loc + scale eps for a diagonal q, loc + eps L^T for a Gaussian with
    lower-triangular scale L. Passing noise lets a batch loss draw all of a batch's noise at once
    (:func:`dlvm_jax.objectives.make_loss`) instead of splitting one key per example."""
    if is_key(key):
        return q.sample(seed=key, sample_shape=num_samples)
    shape = (num_samples,) + tuple(q.event_shape)
    if key.shape != shape:
        raise ValueError(f"noise for {num_samples} samples of q must have shape {shape}, got {key.shape}")
    if isinstance(q, distrax.MultivariateNormalDiag):
        return q.loc + q.scale_diag * key
    if isinstance(q, distrax.MultivariateNormalTri):
        return q.loc + key @ jnp.swapaxes(q.scale_tri, -1, -2)
    raise TypeError(f"sampling from noise needs a Gaussian q, got {type(q).__name__}; pass a PRNG key")


def kl_diag_gaussians(q_loc: Array, q_scale: Array, p_loc: Array, p_scale: Array) -> Array:
    r"""KL(q || p) between diagonal Gaussians, summed over the last axis.

    .. math:: \sum_d \log\frac{\sigma_p}{\sigma_q} + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{2\sigma_p^2} - \frac12
    """
    ratio = jnp.square(q_scale / p_scale)
    diff = jnp.square((q_loc - p_loc) / p_scale)
    return 0.5 * sum_last(ratio + diff - 1.0 - jnp.log(ratio))


def kl_divergence(q: Distribution, p: Distribution) -> Array:
    """Analytic KL(q || p): closed form between diagonal Gaussians, distrax's own KL otherwise."""
    if isinstance(q, distrax.MultivariateNormalDiag) and isinstance(p, distrax.MultivariateNormalDiag):
        return kl_diag_gaussians(q.loc, q.scale_diag, p.loc, p.scale_diag)
    return q.kl_divergence(p)


# --------------------------------------------------------------------------------------------------------------
# Bernoulli on logits
# --------------------------------------------------------------------------------------------------------------


class Bernoulli(distrax.Bernoulli):
    r"""distrax's Bernoulli on logits, with ``log_prob(x) = x l - softplus(l)``.

    The same function as distrax's ``x log sigmoid(l) + (1 - x) log sigmoid(-l)`` (as log sigmoid(l) = l - softplus(l)
    and log sigmoid(-l) = -softplus(l)), for x in {0, 1} and for grey levels x in [0, 1] alike, but with one softplus
    per pixel instead of two and without the ``multiply_no_nan`` guards (logits are finite). On the 784-pixel
    decoders this is the most expensive elementwise work of a step: measured by ``benchmarks/profile_is.py``, the
    decoder and log p(x | z) of 10,000 samples take 26-33 ms this way against 69-80 ms through distrax's
    ``log_prob``.
    """

    def __init__(self, logits: Array):
        super().__init__(logits=logits)

    def log_prob(self, value: Array) -> Array:
        logits = self.logits
        return value * logits - softplus(logits)

    def __getitem__(self, index) -> "Bernoulli":
        return Bernoulli(self.logits[index])


# --------------------------------------------------------------------------------------------------------------
# Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019)
# --------------------------------------------------------------------------------------------------------------

# Below this |logit| the normaliser and the inverse CDF use their Taylor series (the closed forms are 0/0 at 0).
_CB_TAYLOR = 1e-2
# The mean's closed form cancels more strongly (two terms ~1/eta), so its series is used up to |eta| = 0.3.
_CB_MEAN_TAYLOR = 0.3


def cb_log_normalizer(logits: Array) -> Array:
    r"""log C(lambda) of the continuous Bernoulli, written in the logit eta = log(lambda / (1 - lambda)).

    With lambda = sigmoid(eta): 1 - 2 lambda = -tanh(eta/2) and 2 atanh(1 - 2 lambda) = -eta, so
    C = eta / tanh(eta / 2), an even function equal to 2 at eta = 0. With y = |eta|/2,
    log C = log 2 + log y - log tanh y, and for small y, log(y / tanh y) = y^2/3 - 7 y^4/90 + O(y^6).
    """
    y = 0.5 * jnp.abs(logits)
    small = y < _CB_TAYLOR
    y_safe = jnp.where(small, 1.0, y)
    # log tanh y = log(1 - e^{-2y}) - log(1 + e^{-2y}), stable for large y.
    e = jnp.exp(-2.0 * y_safe)
    exact = jnp.log(y_safe) - jnp.log1p(-e) + jnp.log1p(e)
    y2 = jnp.square(y)
    taylor = y2 / 3.0 - 7.0 * jnp.square(y2) / 90.0
    return math.log(2.0) + jnp.where(small, taylor, exact)


def _cb_log_mix(eta: Array, v: Array, w: Array) -> Array:
    r"""log(w + v e^eta) = log(1 + v expm1(eta)) for eta <= 0 and w = 1 - v, accurate in both tails.

    While t = v expm1(eta) > -1/2 it is log1p(t); below, it is the log of the sum of two positive terms
    (w is passed in exactly, not formed as 1 - v). Either way the logarithm keeps full relative precision
    (log1p alone is off by up to ~1e-3 in x at |eta| = 10-20 for v within 1e-5 of 1).
    """
    t = v * jnp.expm1(eta)
    return jnp.where(t > -0.5, jnp.log1p(t), jnp.log(w + v * jnp.exp(eta)))


class ContinuousBernoulli(distrax.Distribution):
    r"""Continuous Bernoulli on [0, 1] with density C(lambda) lambda^x (1 - lambda)^(1 - x), parameterised by logits.

    ``log_prob(x) = x * eta - softplus(eta) + log C(eta)``, stable for every logit including eta near 0
    (lambda near 1/2). Sampling is reparameterised through the inverse CDF
    ``F^{-1}(u) = log(1 + u (e^eta - 1)) / eta``.
    """

    equiv_tfp_cls = None

    def __init__(self, logits: Array):
        super().__init__()
        self._logits = jnp.asarray(logits)

    @property
    def logits(self) -> Array:
        return self._logits

    @property
    def probs(self) -> Array:
        return jax.nn.sigmoid(self._logits)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return ()

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self._logits.shape

    def log_prob(self, value: Array) -> Array:
        eta = self._logits
        return value * eta - softplus(eta) + cb_log_normalizer(eta)

    def _icdf(self, u: Array) -> Array:
        eta = jnp.broadcast_to(self._logits, u.shape)
        small = jnp.abs(eta) < _CB_TAYLOR
        eta_safe = jnp.where(small, 1.0, eta)
        pos = eta_safe > 0
        # eta < 0: log(1 + u expm1(eta)) / eta; eta > 0: 1 + log(1 + (1 - u) expm1(-eta)) / eta (no overflow).
        log_mix = _cb_log_mix(-jnp.abs(eta_safe), jnp.where(pos, 1.0 - u, u), jnp.where(pos, u, 1.0 - u))
        exact = jnp.where(pos, 1.0, 0.0) + log_mix / eta_safe
        # Expansion in eta around 0: u + eta u (1 - u) / 2 + eta^2 u (1 - u) (1 - 2u) / 6 + O(eta^3).
        taylor = u + u * (1.0 - u) * (0.5 * eta + jnp.square(eta) * (1.0 - 2.0 * u) / 6.0)
        return jnp.clip(jnp.where(small, taylor, exact), 0.0, 1.0)

    def _sample_n(self, key: Array, n: int) -> Array:
        u = jax.random.uniform(key, (n,) + self.batch_shape, dtype=self._logits.dtype, minval=1e-7, maxval=1.0 - 1e-7)
        return self._icdf(u)

    def mean(self) -> Array:
        r"""E[x] = lambda / (2 lambda - 1) + 1 / (2 atanh(1 - 2 lambda)) = 1 / (1 - e^{-eta}) - 1/eta.

        The two terms cancel for small eta (float32 error ~1e-7 / |eta|), so below |eta| = 0.3 the series
        1/2 + eta/12 - eta^3/720 + eta^5/30240 (Bernoulli numbers; next term eta^7/1209600 < 2e-10) is used.
        """
        eta = self._logits
        small = jnp.abs(eta) < _CB_MEAN_TAYLOR
        eta_safe = jnp.where(small, 1.0, eta)
        exact = jax.nn.sigmoid(eta_safe) / jnp.tanh(0.5 * eta_safe) - 1.0 / eta_safe  # finite gradients at any eta
        eta2 = jnp.square(eta)
        taylor = 0.5 + eta * (1.0 / 12.0 - eta2 * (1.0 / 720.0 - eta2 / 30240.0))
        return jnp.where(small, taylor, exact)

    def __getitem__(self, index) -> "ContinuousBernoulli":
        return ContinuousBernoulli(self._logits[index])


# --------------------------------------------------------------------------------------------------------------
# Likelihood families: decoder output -> distribution over one data point
# --------------------------------------------------------------------------------------------------------------


class Independent(distrax.Independent):
    """distrax's ``Independent``, whose ``log_prob`` sums the event axes with :func:`sum_last` (a short event, such
    as a 2-D data point, is summed elementwise; an image exactly as distrax does)."""

    def log_prob(self, value: Array) -> Array:
        lp = self.distribution.log_prob(value)
        lead = lp.shape[: lp.ndim - self.reinterpreted_batch_ndims]
        return sum_last(lp.reshape(lead + (-1,)))

    def __getitem__(self, index) -> "Independent":
        base = super().__getitem__(index)
        return Independent(base.distribution, reinterpreted_batch_ndims=base.reinterpreted_batch_ndims)


def likelihood_param_size(likelihood: str, data_size: int) -> int:
    """Number of decoder outputs a likelihood family needs for ``data_size`` values."""
    check_likelihood(likelihood)
    return 2 * data_size if likelihood == "gaussian" else data_size


def check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")


def likelihood_dist(likelihood: str, params: Array, data_shape: tuple[int, ...]) -> Distribution:
    """Distribution over one data point of ``data_shape`` from flat decoder outputs ``params`` (shape (..., P)).

    Leading axes of ``params`` become batch axes of the result; the event is the whole data point.
    """
    check_likelihood(likelihood)
    lead = params.shape[:-1]
    ndims = len(data_shape)
    if likelihood == "gaussian":
        loc, raw_scale = jnp.split(params, 2, axis=-1)
        base = distrax.Normal(loc.reshape(lead + data_shape), positive_scale(raw_scale).reshape(lead + data_shape))
    else:
        logits = params.reshape(lead + data_shape)
        base = Bernoulli(logits) if likelihood == "bernoulli" else ContinuousBernoulli(logits)
    return Independent(base, reinterpreted_batch_ndims=ndims)


def likelihood_mean(dist: Distribution) -> Array:
    """Mean of a likelihood returned by :func:`likelihood_dist` (for reconstructions and sample figures)."""
    return dist.distribution.mean()
