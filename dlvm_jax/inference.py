r"""Inference diagnostics: per-datapoint refinement of q (the amortisation and approximation gaps), the variance
of gradient estimators, and imputation of missing values with a trained model.

**Gaps** (Cremer, Li & Duvenaud 2018). For an amortised Gaussian q(z | x) = N(mu_phi(x), Sigma_phi(x)), let
q* be the best Gaussian of the same family for this x alone, argmax ELBO(q). Then

    log p(x) - ELBO(q) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q)]
                       =   approximation gap   +   amortisation gap.

:func:`make_refiner` finds q* by stochastic gradient ascent on the ELBO of each point, starting from the encoder's
output (the optax optimiser vmapped over points, ``lax.scan`` over steps, jitted); :func:`decompose_gaps` measures
the three quantities, log p(x) by importance sampling from the amortised q (and, as a check, from q*).

**Gradient-estimator variance**: :func:`gradient_statistics` gives the per-parameter mean and variance of the
gradient of a loss over many keys (a fixed minibatch), merged chunk by chunk (Chan et al.'s parallel variance).

**Imputation** of the unobserved entries x_m of x = (x_o, x_m) with a trained model p(x | z) p(z) and encoder q:
the encoder sees the image completed with a fill value (x_o, fill), and everything that weighs a z uses only the
observed entries, log p(x_o | z) = sum_{i observed} log p(x_i | z) (the likelihood factorises over entries).

* :func:`impute_importance`: self-normalised importance sampling for p(z | x_o) with proposal q(z | x_o, fill),
  weights w_k = p(x_o | z_k) p(z_k) / q(z_k | x_o, fill). Single imputation E[x_m | x_o] ~= sum_k w~_k E[x_m | z_k];
  draws by importance resampling (z ~ Categorical(w~), x_m ~ p(x_m | z)).
* :func:`impute_mwg`: Metropolis-within-Gibbs (Mattei & Frellsen 2018) on (z, x_m): an independent Metropolis-
  Hastings step for z with proposal q(z | x_o, x_m) and target p(z | x_o, x_m), then x_m ~ p(x_m | z). Its
  stationary distribution is p(z, x_m | x_o); the imputation is the average of E[x_m | z_t] after burn-in.

Observed entries are copied from the input unchanged by both.

Closed forms for the linear-Gaussian model (:func:`linear_gaussian_posterior`, :func:`linear_gaussian_elbo`,
:func:`linear_gaussian_conditional_mean`) are the ground truth the tests compare these tools with.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dlvm_jax import distributions as dists
from dlvm_jax.likelihood import ISEstimate, chunked, proposal_log_weights, weight_statistics
from dlvm_jax.objectives import check_num_samples

Params = Any
VarParams = dict[str, jax.Array]
REFINE_ESTIMATORS = ("stl", "reparam")


# --------------------------------------------------------------------------------------------------------------
# Gaussian variational families in unconstrained coordinates
# --------------------------------------------------------------------------------------------------------------


def variational_params(q: dists.Distribution) -> VarParams:
    """Unconstrained parameters of a Gaussian q: ``{"loc", "log_scale"}`` for a diagonal Gaussian, ``{"loc",
    "scale_tril"}`` (lower triangle, log of the diagonal on the diagonal) for a full-covariance one."""
    if hasattr(q, "scale_diag"):
        return {"loc": q.loc, "log_scale": jnp.log(q.scale_diag)}
    if hasattr(q, "scale_tri"):
        tri = q.scale_tri
        diag = jnp.diagonal(tri, axis1=-2, axis2=-1)
        return {"loc": q.loc, "scale_tril": jnp.tril(tri, -1) + _embed_diag(jnp.log(diag))}
    raise TypeError(f"refinement needs a diagonal or full-covariance Gaussian q, got {type(q).__name__}")


def _embed_diag(d: jax.Array) -> jax.Array:
    return d[..., :, None] * jnp.eye(d.shape[-1], dtype=d.dtype)


def variational_dist(vp: VarParams) -> dists.Distribution:
    """The Gaussian with unconstrained parameters ``vp`` (inverse of :func:`variational_params`)."""
    if "log_scale" in vp:
        return dists.diag_gaussian(vp["loc"], jnp.exp(vp["log_scale"]))
    raw = vp["scale_tril"]
    diag = jnp.diagonal(raw, axis1=-2, axis2=-1)
    return dists.full_gaussian(vp["loc"], jnp.tril(raw, -1) + _embed_diag(jnp.exp(diag)))


def widen(q: dists.Distribution, factor: float) -> dists.Distribution:
    """The Gaussian q with its scale (standard deviations, or the whole Cholesky factor) multiplied by ``factor``:
    a heavier-covering importance proposal."""
    vp = variational_params(q)
    if "log_scale" in vp:
        return variational_dist({"loc": vp["loc"], "log_scale": vp["log_scale"] + math.log(factor)})
    raw = vp["scale_tril"]
    return variational_dist({"loc": vp["loc"], "scale_tril": jnp.tril(raw, -1) * factor
                             + (raw - jnp.tril(raw, -1)) + _embed_diag(jnp.full(raw.shape[:-1], math.log(factor)))})


def local_elbo(model: Any, params: Params, vp: VarParams, x: jax.Array, key: jax.Array, *, num_samples: int,
               estimator: str = "stl") -> jax.Array:
    """Monte-Carlo ELBO of the Gaussian q = :func:`variational_dist` (``vp``) for one example, differentiable in
    ``vp`` by reparameterisation: ``"stl"`` holds log q's parameters constant (sticking the landing; the gradient
    vanishes at q = p(z | x)), ``"reparam"`` uses the analytic KL(q || p(z))."""
    q = variational_dist(vp)
    z = q.sample(seed=key, sample_shape=num_samples)
    rec = jnp.mean(model.decode(params, z).log_prob(x))
    prior = model.prior(params)
    if estimator == "stl":
        log_q = variational_dist(jax.lax.stop_gradient(vp)).log_prob(z)
        return rec + jnp.mean(prior.log_prob(z) - log_q)
    return rec - dists.kl_divergence(q, prior)


class Refinement(NamedTuple):
    """Result of refining q for a batch of N points."""

    params: VarParams  #: refined variational parameters, leading axis N
    trace: jax.Array  #: (N, steps): the Monte-Carlo ELBO estimate at every step (before its update)


@functools.lru_cache(maxsize=32)
def make_refiner(model: Any, *, steps: int = 500, learning_rate: float = 1e-2, num_samples: int = 10,
                 estimator: str = "stl", final_learning_rate: float = 1e-4) -> Callable:
    """Jitted ``refine(params, batch, key) -> Refinement``: per point, ``steps`` Adam steps on the ELBO of q's own
    parameters, from the encoder's output; learning rate ``learning_rate`` decayed (cosine) to
    ``final_learning_rate``; ``num_samples`` reparameterised samples per step. One optimiser state per point
    (``vmap`` over the batch of the whole ``lax.scan`` over steps); the model's parameters stay fixed. Cached per
    (model, options), so repeated calls compile once."""
    steps = check_num_samples(steps, "steps")
    num_samples = check_num_samples(num_samples)
    if estimator not in REFINE_ESTIMATORS:
        raise ValueError(f"unknown refinement estimator {estimator!r}; choose one of {', '.join(REFINE_ESTIMATORS)}")
    if not learning_rate > 0 or not final_learning_rate > 0:
        raise ValueError(f"learning rates must be > 0, got {learning_rate} and {final_learning_rate}")
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=final_learning_rate / learning_rate))

    def refine_one(params: Params, x: jax.Array, key: jax.Array) -> tuple[VarParams, jax.Array]:
        vp = variational_params(model.encode(params, x))
        neg = jax.value_and_grad(
            lambda v, k: -local_elbo(model, params, v, x, k, num_samples=num_samples, estimator=estimator))

        def body(carry, k):
            v, opt = carry
            loss, g = neg(v, k)
            updates, opt = tx.update(g, opt, v)
            return (optax.apply_updates(v, updates), opt), -loss

        (vp, _), trace = jax.lax.scan(body, (vp, tx.init(vp)), jax.random.split(key, steps))
        return vp, trace

    @jax.jit
    def refine(params: Params, batch: jax.Array, key: jax.Array) -> Refinement:
        keys = jax.random.split(key, batch.shape[0])
        return Refinement(*jax.vmap(refine_one, in_axes=(None, 0, 0))(params, batch, keys))

    return refine


def _batches(data: np.ndarray, batch_size: int):
    """(index, padded batch, real size) for consecutive batches; the last is padded by repeating its last row."""
    n = data.shape[0]
    for i in range(-(-n // batch_size)):
        batch = data[i * batch_size:(i + 1) * batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        yield i, jnp.asarray(batch), real


def refine(model: Any, params: Params, data: Any, key: jax.Array, *, batch_size: int = 100, progress: bool = True,
           **options: Any) -> Refinement:
    """:func:`make_refiner` (``options``) over every row of ``data``, ``batch_size`` rows per call (keys
    ``fold_in(key, i)``; the last batch padded, the padding dropped)."""
    data = np.asarray(data, np.float32)
    if data.shape[0] == 0:
        raise ValueError("refine got an empty dataset")
    batch_size = min(check_num_samples(batch_size, "batch_size"), data.shape[0])
    fn = make_refiner(model, **options)
    parts = []
    for i, batch, real in tqdm(list(_batches(data, batch_size)), desc="refine q", disable=not progress,
                               leave=False):
        out = fn(params, batch, jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda a, r=real: a[:r], out))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


# --------------------------------------------------------------------------------------------------------------
# Evaluating a given q: importance-sampled log p(x) and the ELBO with its standard error
# --------------------------------------------------------------------------------------------------------------


class QEvaluation(NamedTuple):
    """Per-example evaluation of one proposal q with K samples (arrays of shape (N,))."""

    estimate: ISEstimate  #: IS log p(x) with proposal q, its s.e., the ELBO (mean log-weight), ESS
    elbo_stderr: jax.Array  #: Monte-Carlo standard error of the ELBO estimate: sd(log w) / sqrt(K)


def _evaluate_weights(log_w: jax.Array) -> QEvaluation:
    k = log_w.shape[-1]
    return QEvaluation(weight_statistics(log_w), jnp.std(log_w, axis=-1) / math.sqrt(k))


@functools.lru_cache(maxsize=32)
def make_q_evaluator(model: Any, *, num_samples: int = 5000, chunk_size: int = 500) -> Callable:
    """Jitted ``evaluate(params, batch, vparams, key) -> QEvaluation`` (one key per row from ``key``): K log-weights
    per row with proposal the amortised q(z | x) (``vparams=None``) or :func:`variational_dist` (``vparams``,
    leading axis = rows). Cached per (model, K, chunk size), so repeated calls compile once."""
    num_samples = check_num_samples(num_samples)
    chunk_size = check_num_samples(chunk_size, "chunk_size")

    @jax.jit
    def evaluate(params: Params, batch: jax.Array, vp: VarParams | None, key: jax.Array) -> QEvaluation:
        keys = jax.random.split(key, batch.shape[0])

        def one(x, v, k):
            q = model.encode(params, x) if v is None else variational_dist(v)
            return chunked(lambda kk, m: proposal_log_weights(model, params, x, q, kk, m), k, num_samples,
                           chunk_size)

        log_w = jax.vmap(one, in_axes=(0, None if vp is None else 0, 0))(batch, vp, keys)
        return _evaluate_weights(log_w)

    return evaluate


def evaluate_q(model: Any, params: Params, data: Any, key: jax.Array, *, vparams: VarParams | None = None,
               num_samples: int = 5000, chunk_size: int = 500, batch_size: int = 20,
               progress: bool = True) -> QEvaluation:
    """K = ``num_samples`` log-weights per row of ``data`` with proposal q: the amortised q(z | x) of the model
    (``vparams=None``) or the Gaussians :func:`variational_dist` (``vparams``, leading axis = rows). Batch ``i``
    uses ``fold_in(key, i)``, so the two proposals see the same keys."""
    data = np.asarray(data, np.float32)
    n = data.shape[0]
    if n == 0:
        raise ValueError("evaluate_q got an empty dataset")
    batch_size = min(check_num_samples(batch_size, "batch_size"), n)
    batch_eval = make_q_evaluator(model, num_samples=num_samples, chunk_size=chunk_size)
    parts = []
    for i, batch, real in tqdm(list(_batches(data, batch_size)), desc=f"evaluate q, K={num_samples}",
                               disable=not progress, leave=False):
        vp = None
        if vparams is not None:
            vp = jax.tree.map(lambda a: _pad_rows(a[i * batch_size:(i + 1) * batch_size], batch_size), vparams)
        out = batch_eval(params, batch, vp, jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda a, r=real: a[:r], out))
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def _pad_rows(a: jax.Array, size: int) -> jax.Array:
    if a.shape[0] == size:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], size - a.shape[0], axis=0)])


class Gaps(NamedTuple):
    """Per-example quantities of the gap decomposition (arrays of shape (N,))."""

    log_px: jax.Array  #: IS log p(x), proposal = amortised q, K samples
    log_px_stderr: jax.Array  #: its Monte-Carlo standard error (delta method)
    log_px_refined_q: jax.Array  #: IS log p(x), proposal = refined q*, same K (a second estimate)
    elbo_amortised: jax.Array  #: ELBO(q), K samples
    elbo_amortised_stderr: jax.Array
    elbo_refined: jax.Array  #: ELBO(q*), K samples
    elbo_refined_stderr: jax.Array
    ess_amortised: jax.Array
    ess_refined: jax.Array

    def summary(self) -> dict[str, float]:
        """Dataset means (nats per example), the two gaps, and standard errors over the examples."""
        n = int(self.log_px.shape[0])

        def mean_se(a: jax.Array) -> tuple[float, float]:
            a = np.asarray(a, np.float64)
            return float(a.mean()), float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")

        out: dict[str, float] = {"num_examples": n}
        for name, values in (("log_px", self.log_px), ("log_px_refined_q", self.log_px_refined_q),
                             ("elbo_refined", self.elbo_refined), ("elbo_amortised", self.elbo_amortised),
                             ("approximation_gap", self.log_px - self.elbo_refined),
                             ("amortisation_gap", self.elbo_refined - self.elbo_amortised),
                             ("inference_gap", self.log_px - self.elbo_amortised),
                             # The same gaps with log p(x) from the refined proposal q*: IS from a poor amortised q
                             # underestimates log p(x) at low ESS, which hides part of the approximation gap.
                             ("approximation_gap_qstar_is", self.log_px_refined_q - self.elbo_refined),
                             ("inference_gap_qstar_is", self.log_px_refined_q - self.elbo_amortised),
                             ("ess_amortised", self.ess_amortised), ("ess_refined", self.ess_refined)):
            out[name], out[f"{name}_se_over_data"] = mean_se(values)
        out["log_px_mc_se"] = float(np.sqrt(np.sum(np.square(np.asarray(self.log_px_stderr, np.float64)))) / n)
        out["elbo_refined_mc_se"] = float(
            np.sqrt(np.sum(np.square(np.asarray(self.elbo_refined_stderr, np.float64)))) / n)
        out["elbo_amortised_mc_se"] = float(
            np.sqrt(np.sum(np.square(np.asarray(self.elbo_amortised_stderr, np.float64)))) / n)
        return out


def decompose_gaps(model: Any, params: Params, data: Any, key: jax.Array, *, num_samples: int = 5000,
                   chunk_size: int = 500, batch_size: int = 20, refine_batch_size: int = 100, progress: bool = True,
                   refinement: Refinement | None = None, **refine_options: Any) -> tuple[Gaps, Refinement]:
    """The Cremer et al. decomposition for every row of ``data``: refine q (``refine_options``, see
    :func:`make_refiner`; or pass a ``refinement`` already computed), then evaluate the amortised q and q* with
    K = ``num_samples`` samples each (the same keys)."""
    k_refine, k_eval = jax.random.split(key)
    if refinement is None:
        refinement = refine(model, params, data, k_refine, batch_size=refine_batch_size, progress=progress,
                            **refine_options)
    amortised = evaluate_q(model, params, data, k_eval, num_samples=num_samples, chunk_size=chunk_size,
                           batch_size=batch_size, progress=progress)
    refined = evaluate_q(model, params, data, k_eval, vparams=refinement.params, num_samples=num_samples,
                         chunk_size=chunk_size, batch_size=batch_size, progress=progress)
    gaps = Gaps(amortised.estimate.log_px, amortised.estimate.stderr, refined.estimate.log_px,
                amortised.estimate.elbo, amortised.elbo_stderr, refined.estimate.elbo, refined.elbo_stderr,
                amortised.estimate.ess, refined.estimate.ess)
    return gaps, refinement


# --------------------------------------------------------------------------------------------------------------
# Variance of gradient estimators
# --------------------------------------------------------------------------------------------------------------


class GradientStatistics(NamedTuple):
    """Per-parameter mean and (unbiased) variance of a stochastic gradient over ``num_keys`` keys."""

    mean: Params
    variance: Params
    num_keys: int

    def mean_variance(self, group: str | None = None) -> float:
        """Mean over parameters (of the top-level ``group`` of the pytree, e.g. ``"encoder"``, or all) of the
        per-parameter variance."""
        tree = self.variance if group is None else self.variance[group]
        leaves = [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)]
        return float(np.concatenate(leaves).mean())

    def mean_square_gradient(self, group: str | None = None) -> float:
        """Mean over parameters of the squared mean gradient (the signal the variance is the noise of)."""
        tree = self.mean if group is None else self.mean[group]
        leaves = [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)]
        return float(np.square(np.concatenate(leaves)).mean())


def make_gradient_statistics(loss_fn: Callable, *, num_keys: int = 1000, chunk: int = 50,
                             step: int = 10**9) -> Callable:
    """Jitted ``stats(params, batch, key) -> GradientStatistics``: mean and variance over ``num_keys`` keys
    (``split(key, num_keys)``) of ``grad loss_fn(params, batch, k, step)`` for a fixed ``batch``, ``chunk``
    gradients at a time (``vmap``), merged by ``lax.scan`` with the pairwise update of Chan, Golub & LeVeque
    (float32, no catastrophic cancellation). ``chunk`` is lowered to a divisor of ``num_keys``."""
    num_keys = check_num_samples(num_keys, "num_keys")
    if num_keys < 2:
        raise ValueError(f"a variance needs num_keys >= 2, got {num_keys}")
    chunk = min(check_num_samples(chunk, "chunk"), num_keys)
    while num_keys % chunk:
        chunk -= 1
    grad = jax.grad(lambda p, b, k: loss_fn(p, b, k, step)[0])

    @jax.jit
    def run(params: Params, batch: jax.Array, key: jax.Array) -> tuple[Params, Params]:
        def chunk_stats(k):
            g = jax.vmap(grad, in_axes=(None, None, 0))(params, batch, k)
            mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), g)
            m2 = jax.tree.map(lambda a, m: jnp.sum(jnp.square(a - m), axis=0), g, mean)
            return mean, m2

        def body(carry, k):
            n_a, mean_a, m2_a = carry
            mean_b, m2_b = chunk_stats(k)
            n = n_a + chunk
            delta = jax.tree.map(jnp.subtract, mean_b, mean_a)
            mean = jax.tree.map(lambda ma, d: ma + d * (chunk / n), mean_a, delta)
            m2 = jax.tree.map(lambda a, b, d: a + b + jnp.square(d) * (n_a * chunk / n), m2_a, m2_b, delta)
            return (n, mean, m2), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        keys = jax.random.split(key, num_keys).reshape((-1, chunk))
        (n, mean, m2), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros, zeros), keys)
        return mean, jax.tree.map(lambda a: a / (n - 1), m2)

    def stats(params: Params, batch: jax.Array, key: jax.Array) -> GradientStatistics:
        mean, variance = run(params, batch, key)
        return GradientStatistics(mean, variance, num_keys)

    return stats


def gradient_statistics(loss_fn: Callable, params: Params, batch: jax.Array, key: jax.Array, *,
                        num_keys: int = 1000, chunk: int = 50, step: int = 10**9) -> GradientStatistics:
    """One call of :func:`make_gradient_statistics` (build the function once to reuse its compilation)."""
    return make_gradient_statistics(loss_fn, num_keys=num_keys, chunk=chunk, step=step)(params, batch, key)


# --------------------------------------------------------------------------------------------------------------
# Imputation of missing values
# --------------------------------------------------------------------------------------------------------------


def elementwise_log_prob(dist: dists.Distribution, x: jax.Array) -> jax.Array:
    """log p(x_i | z) for every entry i of the data point (the likelihoods factorise): shape (..., *data_shape)."""
    if hasattr(dist, "scale_diag"):  # a diagonal Gaussian over the last axis (the linear-Gaussian model)
        r = (x - dist.loc) / dist.scale_diag
        return -0.5 * jnp.square(r) - jnp.log(dist.scale_diag) - 0.5 * math.log(2 * math.pi)
    if hasattr(dist, "reinterpreted_batch_ndims"):  # Independent over the data dimensions (VAE likelihoods)
        return dist.distribution.log_prob(x)
    raise TypeError(f"cannot split the log-likelihood of a {type(dist).__name__} over entries")


def observed_log_prob(dist: dists.Distribution, x: jax.Array, observed: jax.Array) -> jax.Array:
    """log p(x_o | z) = sum over the observed entries of log p(x_i | z); shape = the batch shape of ``dist``."""
    lp = elementwise_log_prob(dist, x)
    axes = tuple(range(lp.ndim - observed.ndim, lp.ndim))
    return jnp.sum(jnp.where(observed, lp, 0.0), axis=axes)


def _fill(x: jax.Array, observed: jax.Array, fill: jax.Array | float) -> jax.Array:
    return jnp.where(observed, x, jnp.asarray(fill, x.dtype))


class Imputation(NamedTuple):
    """Imputations of one or more examples; observed entries equal the input's."""

    mean: jax.Array  #: single imputation: E[x_m | x_o] in the missing entries
    draws: jax.Array  #: (..., num_draws, *data_shape) multiple imputations x_m ~ p(x_m | x_o)
    diagnostic: jax.Array  #: ESS of the weights (importance) or the acceptance rate (Metropolis-within-Gibbs)


def impute_importance(model: Any, params: Params, x: jax.Array, observed: jax.Array, key: jax.Array, *,
                      num_samples: int = 1000, num_draws: int = 1, fill: jax.Array | float = 0.0,
                      proposal_scale: float = 1.0) -> Imputation:
    r"""Importance-sampling imputation of one example (``observed``: boolean mask of the data shape).

    z_k ~ r(z), r = q(z | x~) with x~ = x with the missing entries set to ``fill`` (and its scale multiplied by
    ``proposal_scale``, :func:`widen`); log w_k = log p(x_o | z_k) + log p(z_k) - log r(z_k). Returns the self-normalised estimate sum_k w~_k E[x_m | z_k] (single imputation), and
    ``num_draws`` draws by importance resampling: z ~ Categorical(w~), x_m ~ p(x_m | z)."""
    num_samples = check_num_samples(num_samples)
    observed = jnp.asarray(observed, bool)
    k_z, k_idx, k_x = jax.random.split(key, 3)
    q = model.encode(params, _fill(x, observed, fill))
    if proposal_scale != 1.0:
        q = widen(q, proposal_scale)
    z = q.sample(seed=k_z, sample_shape=num_samples)
    lik = model.decode(params, z)
    log_w = observed_log_prob(lik, x, observed) + model.prior(params).log_prob(z) - q.log_prob(z)
    w = jax.nn.softmax(log_w)
    cond_mean = jnp.tensordot(w, lik.mean(), axes=1)
    idx = jax.random.categorical(k_idx, log_w, shape=(num_draws,))
    draws = model.decode(params, z[idx]).sample(seed=k_x)
    ess = 1.0 / jnp.sum(jnp.square(w))
    return Imputation(jnp.where(observed, x, cond_mean), jnp.where(observed, x, draws), ess)


def impute_mwg(model: Any, params: Params, x: jax.Array, observed: jax.Array, key: jax.Array, *,
               steps: int = 500, burn_in: int = 100, num_draws: int = 1,
               fill: jax.Array | float = 0.0) -> Imputation:
    r"""Metropolis-within-Gibbs imputation of one example (Mattei & Frellsen 2018).

    Start: z_0 ~ q(z | x~) (``fill`` in the missing entries), x_m ~ p(x_m | z_0). Each step t, with the current
    completion x^t = (x_o, x_m^t): propose z' ~ q(z | x^t) and accept with probability
    min(1, [p(x^t | z') p(z') q(z_t | x^t)] / [p(x^t | z_t) p(z_t) q(z' | x^t)]) (an independent MH step whose
    target is p(z | x^t)); then x_m^{t+1} ~ p(x_m | z_{t+1}). The single imputation averages E[x_m | z_t] over the
    ``steps - burn_in`` steps after burn-in (Rao-Blackwellised); ``draws`` are the completions at ``num_draws``
    evenly spaced steps after burn-in; ``diagnostic`` is the acceptance rate."""
    steps = check_num_samples(steps, "steps")
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in must be in [0, steps), got {burn_in} with steps={steps}")
    observed = jnp.asarray(observed, bool)
    prior = model.prior(params)
    k0, k0x, k_run = jax.random.split(key, 3)
    z0 = model.encode(params, _fill(x, observed, fill)).sample(seed=k0)
    x0 = jnp.where(observed, x, model.decode(params, z0).sample(seed=k0x))
    keep = steps - burn_in
    every = max(keep // num_draws, 1)
    draw_steps = burn_in + every * (jnp.arange(num_draws) + 1) - 1  # the last one is the final step

    def body(carry, inp):
        z, xc, mean_acc, draws, accepted = carry
        t, k = inp
        k_prop, k_u, k_x = jax.random.split(k, 3)
        q = model.encode(params, xc)
        z_new = q.sample(seed=k_prop)
        log_target = lambda zz: model.decode(params, zz).log_prob(xc) + prior.log_prob(zz)  # noqa: E731
        log_rho = log_target(z_new) - log_target(z) + q.log_prob(z) - q.log_prob(z_new)
        accept = jnp.log(jax.random.uniform(k_u)) < log_rho
        z = jnp.where(accept, z_new, z)
        lik = model.decode(params, z)
        xc = jnp.where(observed, x, lik.sample(seed=k_x))
        after = t >= burn_in
        mean_acc = mean_acc + jnp.where(after, lik.mean(), 0.0)
        draws = jnp.where((t == draw_steps).reshape((-1,) + (1,) * x.ndim), xc[None], draws)
        return (z, xc, mean_acc, draws, accepted + accept), None

    init = (z0, x0, jnp.zeros_like(x), jnp.zeros((num_draws,) + x.shape, x.dtype), jnp.zeros((), jnp.int32))
    (z, xc, mean_acc, draws, accepted), _ = jax.lax.scan(
        body, init, (jnp.arange(steps), jax.random.split(k_run, steps)))
    return Imputation(jnp.where(observed, x, mean_acc / keep), draws, accepted / steps)


def make_imputer(model: Any, method: str, **options: Any) -> Callable:
    """Jitted ``impute(params, batch, observed, key) -> Imputation`` for a batch (``observed``: one mask of the data
    shape for all rows, or one per row); ``method`` ``"importance"`` or ``"mwg"`` with their ``options``."""
    fns = {"importance": impute_importance, "mwg": impute_mwg}
    if method not in fns:
        raise ValueError(f"unknown imputation method {method!r}; choose one of {', '.join(fns)}")
    fn = fns[method]

    @jax.jit
    def impute(params: Params, batch: jax.Array, observed: jax.Array, key: jax.Array) -> Imputation:
        keys = jax.random.split(key, batch.shape[0])
        obs_axis = 0 if observed.ndim == batch.ndim else None
        return jax.vmap(lambda x, o, k: fn(model, params, x, o, k, **options), in_axes=(0, obs_axis, 0))(
            batch, observed, keys)

    return impute


def mean_imputation(x: jax.Array, observed: jax.Array, column_means: jax.Array) -> jax.Array:
    """The baseline: every missing entry replaced by that entry's mean over the training data."""
    return jnp.where(observed, x, column_means)


# --------------------------------------------------------------------------------------------------------------
# Closed forms for the linear-Gaussian model (ground truth)
# --------------------------------------------------------------------------------------------------------------


def linear_gaussian_posterior(model: Any, params: Params, x: jax.Array) -> dists.Distribution:
    """The exact posterior p(z | x) of :class:`~dlvm_jax.models.LinearGaussian` (one example)."""
    exact = {"generative": params["generative"], "encoder": model.exact_encoder(params["generative"])}
    return model.encode(exact, x)


def linear_gaussian_elbo(model: Any, params: Params, x: jax.Array,
                         q: dists.Distribution | None = None) -> jax.Array:
    """Exact ELBO of a Gaussian q (default: the model's amortised q(z | x)) for the linear-Gaussian model:
    log p(x) - KL(q || p(z | x)), both in closed form (differentiable in every parameter)."""
    q = model.encode(params, x) if q is None else q
    return model.exact_log_prob(params, x) - dists.kl_divergence(q, linear_gaussian_posterior(model, params, x))


def linear_gaussian_conditional_mean(model: Any, params: Params, x: jax.Array, observed: jax.Array) -> jax.Array:
    """E[x_m | x_o] under the linear-Gaussian model's marginal N(b, W W^T + diag psi), with the observed entries
    copied from ``x``: b_m + Sigma_mo Sigma_oo^{-1} (x_o - b_o) (one example; ``observed`` a boolean mask)."""
    observed = jnp.asarray(observed, bool)
    b = params["generative"]["b"]
    cov = model.marginal_covariance(params)
    # Sigma_oo^{-1} restricted to the observed block, written with masks so that shapes stay static: the missing
    # block of the matrix is replaced by the identity (its entries of x - b zeroed).
    o = observed.astype(cov.dtype)
    cov_oo = cov * jnp.outer(o, o) + jnp.diag(1.0 - o)
    r = jnp.linalg.solve(cov_oo, (x - b) * o)
    cond = b + (cov * o[None, :]) @ r
    return jnp.where(observed, x, cond)
