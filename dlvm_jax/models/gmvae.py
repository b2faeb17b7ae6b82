r"""Gaussian-mixture VAE (Dilokthanakul et al. 2016, arXiv 1611.02648) as pure functions over a params pytree.

Generative model (our l is the paper's x, our x the paper's y):

    w ~ N(0, I),   z ~ Cat(1/K),   l | w, z=k ~ N(mu_k(w), diag sigma_k(w)^2),   x | l ~ likelihood(decoder(l))

Inference: q(w | x) q(l | x), two diagonal Gaussians from one encoder. The cluster posterior is exact given (l, w):

    p(z=k | l, w) = pi_k N(l; mu_k(w), sigma_k(w)) / sum_j pi_j N(l; mu_j(w), sigma_j(w))

so z is never sampled. Minus the ELBO, per example, with M samples (w_m, l_m) ~ q(w|x) q(l|x):

    loss = - (1/M) sum_m log p(x | l_m)                                          (reconstruction)
           + (1/M) sum_m sum_k p(z=k | l_m, w_m) KL(q(l|x) || p(l | w_m, z=k))   (conditional prior)
           + KL(q(w|x) || N(0, I))                                               (w prior)
           + max(lambda, (1/M) sum_m KL(p(z | l_m, w_m) || Cat(1/K)))            (z prior, free bits lambda)

The free-bits clamp acts on the batch mean of the z-prior term: below lambda it contributes no gradient.
As in the paper, the conditional-prior term weights each closed-form KL by p(z=k | l_m, w_m) at the sample, so
this loss equals minus the ELBO exactly only when the cluster weights do not vary with l (e.g. K = 1); the exact
ELBO is the mean of :meth:`GMVAE.log_weights`, whose log-mean-exp is the importance-sampled log p(x).
Every function is written for ONE example and vectorised over clusters and samples (no Python loops).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from dlvm_jax import distributions as dists
from dlvm_jax.networks import MLP
from dlvm_jax.objectives import LossFn, Metrics, check_num_samples

Params = Any


#: How a raw network output becomes a standard deviation: ``softplus(raw) + 1e-4`` (this library's default) or
#: ``exp(raw / 2)``, the raw output read as a log-variance (the paper's code).
SCALES = ("softplus", "log_var")


@dataclasses.dataclass(frozen=True)
class GMVAEConfig:
    """GMVAE architecture. Defaults: the spiral experiment (2-D data, l and w 2-D, K=5 arcs, hidden 100)."""

    data_shape: tuple[int, ...] = (2,)
    clusters: int = 5
    local_dim: int = 2  # l (the paper's x)
    global_dim: int = 2  # w
    hidden: tuple[int, ...] = (100,)
    prior_hidden: tuple[int, ...] = (100,)
    activation: str = "tanh"
    likelihood: str = "gaussian"
    prior_activation: str | None = None  # the prior network's activation; None: ``activation``
    batch_norm: bool = False  # batch normalisation in the encoder's hidden layers (the paper's MNIST recogniser)
    scale: str = "softplus"  # standard deviations from raw outputs: softplus(raw) + 1e-4, or "log_var": exp(raw / 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_shape", tuple(int(d) for d in self.data_shape))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "prior_hidden", tuple(int(h) for h in self.prior_hidden))
        dists.check_likelihood(self.likelihood)
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        for name in ("clusters", "local_dim", "global_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def data_size(self) -> int:
        return math.prod(self.data_shape)


class GMVAE:
    """The GMVAE: ``init``, ``encode``, ``decode``, ``conditional_prior``, ``cluster_posterior``, ``log_weights``."""

    def __init__(self, config: GMVAEConfig):
        self.config = config
        c = config
        self.encoder = MLP(c.hidden, 2 * (c.global_dim + c.local_dim), c.activation, in_ndims=len(c.data_shape),
                           batch_norm=c.batch_norm)
        self.prior_net = MLP(c.prior_hidden, 2 * c.clusters * c.local_dim, c.prior_activation or c.activation)
        self.decoder = MLP(tuple(reversed(c.hidden)), dists.likelihood_param_size(c.likelihood, c.data_size),
                           c.activation)

    def __hash__(self) -> int:
        return hash(self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GMVAE) and other.config == self.config

    def init(self, key: jax.Array) -> Params:
        c = self.config
        ke, kp, kd = jax.random.split(key, 3)
        return {
            # a batch-normalised encoder initialises on a batch (its statistics need one); same parameters
            "encoder": self.encoder.init(ke, jnp.zeros((2,) * c.batch_norm + c.data_shape))["params"],
            "prior": self.prior_net.init(kp, jnp.zeros((c.global_dim,)))["params"],
            "decoder": self.decoder.init(kd, jnp.zeros((c.local_dim,)))["params"],
        }

    # -- distributions ------------------------------------------------------------------------------------------
    def encode(self, params: Params, x: jax.Array) -> tuple[dists.Distribution, dists.Distribution]:
        """(q(w | x), q(l | x)), diagonal Gaussians with event shapes (global_dim,) and (local_dim,).

        A batch-normalised encoder normalises with ``params["encoder_stats"]``: :meth:`with_stats` puts them there
        (the loss does so with each batch's statistics; for evaluation use the training set's)."""
        stats = None
        if self.config.batch_norm:
            stats = params.get("encoder_stats")
            if stats is None:
                raise ValueError("this GMVAE's encoder is batch-normalised: evaluate it with "
                                 "params = model.with_stats(params, x_train) (the training set's statistics)")
        out = self.encoder.apply({"params": params["encoder"]}, x, stats)
        w_raw, l_raw = jnp.split(out, [2 * self.config.global_dim], axis=-1)
        return self._gaussian(w_raw), self._gaussian(l_raw)

    def _std(self, raw: jax.Array) -> jax.Array:
        return jnp.exp(0.5 * raw) if self.config.scale == "log_var" else dists.positive_scale(raw)

    def _gaussian(self, raw: jax.Array) -> dists.Distribution:
        loc, raw_scale = jnp.split(raw, 2, axis=-1)
        return dists.diag_gaussian(loc, self._std(raw_scale))

    def with_stats(self, params: Params, data: jax.Array) -> Params:
        """``params`` with ``"encoder_stats"``: the mean and variance of every batch-normalised hidden layer of the
        encoder over ``data`` (differentiable). ``params`` unchanged for an encoder without batch normalisation."""
        if not self.config.batch_norm:
            return params
        if data.shape[1:] != self.config.data_shape:
            raise ValueError(f"with_stats expects a batch of shape (N, *{self.config.data_shape}), got {data.shape}")
        _, stats = self.encoder.batch_stats({"params": params["encoder"]}, data)
        return {**params, "encoder_stats": stats}

    def decode(self, params: Params, l: jax.Array) -> dists.Distribution:
        """p(x | l) for l of shape (..., local_dim)."""
        out = self.decoder.apply({"params": params["decoder"]}, l)
        return dists.likelihood_dist(self.config.likelihood, out, self.config.data_shape)

    def prior_w(self, params: Params) -> dists.Distribution:
        del params
        return dists.standard_normal(self.config.global_dim)

    def conditional_prior(self, params: Params, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Means and standard deviations of p(l | w, z=k) for all k: two arrays of shape (..., K, local_dim)."""
        c = self.config
        out = self.prior_net.apply({"params": params["prior"]}, w)
        out = out.reshape(out.shape[:-1] + (c.clusters, 2 * c.local_dim))
        loc, raw = jnp.split(out, 2, axis=-1)
        return loc, self._std(raw)

    def init_prior(self, params: Params, means: jax.Array, variances: jax.Array) -> Params:
        """``params`` with the prior network's output layer set so that p(l | w, z=k) = N(means[k], diag
        variances[k]) for every w: its kernel zeroed (w's influence is then learned from there) and its bias set.
        ``means`` and ``variances`` have shape (K, local_dim), e.g. a Gaussian mixture fitted to the encoder's
        posterior means (:func:`pretrained_init`)."""
        c = self.config
        means, variances = jnp.asarray(means, jnp.float32), jnp.asarray(variances, jnp.float32)
        for name, a in (("means", means), ("variances", variances)):
            if a.shape != (c.clusters, c.local_dim):
                raise ValueError(f"{name} must have shape (clusters, local_dim) = {(c.clusters, c.local_dim)}, "
                                 f"got {a.shape}")
        if not bool(jnp.all(variances > 0)):
            raise ValueError("variances must be > 0")
        if c.scale == "log_var":
            raw = jnp.log(variances)
        else:  # softplus(raw) + MIN_SCALE = std
            std = jnp.sqrt(variances)
            if not bool(jnp.all(std > dists.MIN_SCALE)):
                raise ValueError(f"standard deviations must exceed {dists.MIN_SCALE} with scale='softplus'")
            t = std - dists.MIN_SCALE
            raw = t + jnp.log(-jnp.expm1(-t))  # the inverse of softplus, stable for large t
        prior = dict(params["prior"])
        last = f"Dense_{len(c.prior_hidden)}"
        prior[last] = {"kernel": jnp.zeros_like(prior[last]["kernel"]),
                       "bias": jnp.concatenate([means, raw], axis=-1).reshape(-1)}
        return {**params, "prior": prior}

    def log_pi(self) -> jax.Array:
        k = self.config.clusters
        return jnp.full((k,), -math.log(k))

    def component_log_probs(self, params: Params, l: jax.Array, w: jax.Array) -> jax.Array:
        """log pi_k + log N(l; mu_k(w), sigma_k(w)) for every k; shape (..., K)."""
        loc, scale = self.conditional_prior(params, w)
        log_n = dists.diag_gaussian(loc, scale).log_prob(l[..., None, :])
        return self.log_pi() + log_n

    def cluster_posterior(self, params: Params, l: jax.Array, w: jax.Array) -> jax.Array:
        """p(z | l, w) in closed form (Bayes' rule over the K components); shape (..., K), sums to 1."""
        return jnp.exp(dists.log_softmax_last(self.component_log_probs(params, l, w)))

    # -- objective ------------------------------------------------------------------------------------------------
    def loss_terms(self, params: Params, x: jax.Array, key: jax.Array, num_samples: int = 1) -> Metrics:
        """Per-example ELBO terms (all in nats, positive KLs): ``rec``, ``cond_prior``, ``w_prior``, ``z_prior``."""
        return self._loss_terms(params, x, key, num_samples)[0]

    def _loss_terms(self, params: Params, x: jax.Array, key: jax.Array, num_samples: int) -> tuple[Metrics, jax.Array]:
        """:meth:`loss_terms` and ``cond_prior`` with its KLs held constant (the part of its gradient that flows
        through the cluster posterior; see ``cluster_gradient`` in :func:`make_gmvae_loss`)."""
        q_w, q_l = self.encode(params, x)
        k_w, k_l = jax.random.split(key)
        w = q_w.sample(seed=k_w, sample_shape=num_samples)  # (M, Dw)
        l = q_l.sample(seed=k_l, sample_shape=num_samples)  # (M, Dl)
        rec = jnp.mean(self.decode(params, l).log_prob(x))
        loc, scale = self.conditional_prior(params, w)  # (M, K, Dl)
        log_joint = self.log_pi() + dists.diag_gaussian(loc, scale).log_prob(l[:, None, :])  # (M, K)
        log_post = dists.log_softmax_last(log_joint)  # log p(z | l, w) over the K clusters
        post = jnp.exp(log_post)
        kl_l = dists.kl_diag_gaussians(q_l.loc, q_l.scale_diag, loc, scale)  # (M, K)
        cond_prior = jnp.mean(dists.sum_last(post * kl_l))
        through_post = jnp.mean(dists.sum_last(post * jax.lax.stop_gradient(kl_l)))
        w_prior = dists.kl_divergence(q_w, self.prior_w(params))
        z_prior = jnp.mean(dists.sum_last(post * (log_post - self.log_pi())))
        return {"rec": rec, "cond_prior": cond_prior, "w_prior": w_prior, "z_prior": z_prior,
                "elbo": rec - cond_prior - w_prior - z_prior}, through_post

    def log_weights(self, params: Params, x: jax.Array, key: jax.Array, num_samples: int, *,
                    stop_q_grad: bool = False) -> jax.Array:
        """log p(x, l, w) - log q(l, w | x) with z summed out; shape (num_samples,). Feeds the IS estimator."""
        q_w, q_l = self.encode(params, x)
        k_w, k_l = jax.random.split(key)
        w = q_w.sample(seed=k_w, sample_shape=num_samples)
        l = q_l.sample(seed=k_l, sample_shape=num_samples)
        if stop_q_grad:
            q_w, q_l = self.encode(jax.lax.stop_gradient(params), x)
        log_p_l = dists.logsumexp_last(self.component_log_probs(params, l, w))
        log_p = self.decode(params, l).log_prob(x) + log_p_l + self.prior_w(params).log_prob(w)
        return log_p - q_w.log_prob(w) - q_l.log_prob(l)

    # -- use --------------------------------------------------------------------------------------------------------
    def assign_probs(self, params: Params, x: jax.Array, key: jax.Array | None = None,
                     num_samples: int = 0) -> jax.Array:
        """Cluster probabilities of one example: p(z | l, w) at the posterior means, or (``num_samples`` > 0)
        averaged over samples of q(w | x) q(l | x)."""
        q_w, q_l = self.encode(params, x)
        if num_samples <= 0 or key is None:
            return self.cluster_posterior(params, q_l.mean(), q_w.mean())
        k_w, k_l = jax.random.split(key)
        w = q_w.sample(seed=k_w, sample_shape=num_samples)
        l = q_l.sample(seed=k_l, sample_shape=num_samples)
        return jnp.mean(self.cluster_posterior(params, l, w), axis=0)

    def predict(self, params: Params, data: jax.Array, key: jax.Array | None = None,
                num_samples: int = 0) -> jax.Array:
        """Most probable cluster of every row of ``data``: at the posterior means, or (with ``key`` and
        ``num_samples`` > 0) of the cluster posterior averaged over samples of q(w|x) q(l|x); int32 array (N,)."""
        if key is None or num_samples <= 0:
            probs = jax.vmap(lambda x: self.assign_probs(params, x))(data)
        else:
            keys = jax.random.split(key, data.shape[0])
            probs = jax.vmap(lambda x, k: self.assign_probs(params, x, k, num_samples))(data, keys)
        return jnp.argmax(probs, axis=-1).astype(jnp.int32)

    def sample(self, params: Params, key: jax.Array, num: int, cluster: int | None = None,
               mean: bool = True) -> jax.Array:
        """Draw ``num`` data points from the prior, or from one ``cluster``: w ~ N(0, I), l ~ p(l | w, z),
        x ~ p(x | l) (its mean when ``mean``); shape (num, *data_shape)."""
        c = self.config
        k_w, k_z, k_l, k_x = jax.random.split(key, 4)
        w = self.prior_w(params).sample(seed=k_w, sample_shape=num)
        if cluster is None:
            z = jax.random.randint(k_z, (num,), 0, c.clusters)
        else:
            if not 0 <= cluster < c.clusters:
                raise ValueError(f"cluster must be in [0, {c.clusters}), got {cluster}")
            z = jnp.full((num,), cluster)
        loc, scale = self.conditional_prior(params, w)  # (num, K, Dl)
        idx = z[:, None, None]
        loc = jnp.take_along_axis(loc, idx, axis=1)[:, 0]
        scale = jnp.take_along_axis(scale, idx, axis=1)[:, 0]
        l = loc + scale * jax.random.normal(k_l, loc.shape)
        p_x = self.decode(params, l)
        return dists.likelihood_mean(p_x) if mean else p_x.sample(seed=k_x)

    def sample_clusters(self, params: Params, key: jax.Array, num: int) -> jax.Array:
        """``num`` decoded samples (means of p(x | l)) from EVERY cluster at once; shape (K, num, *data_shape)."""
        k_w, k_l = jax.random.split(key)
        w = self.prior_w(params).sample(seed=k_w, sample_shape=num)
        loc, scale = self.conditional_prior(params, w)  # (num, K, Dl)
        l = loc + scale * jax.random.normal(k_l, loc.shape)
        return jnp.swapaxes(dists.likelihood_mean(self.decode(params, l)), 0, 1)


CLUSTER_GRADIENTS = ("elbo", "paper")


def make_gmvae_loss(model: GMVAE, *, num_samples: int = 1, free_bits: float = 0.5,
                    cluster_gradient: str = "elbo") -> LossFn:
    """Batch loss ``loss_fn(params, batch, key, step) -> (loss, metrics)`` of the GMVAE (minus the ELBO with the
    z-prior term clamped below at ``free_bits`` = lambda nats, on its batch mean).

    ``cluster_gradient="paper"`` keeps the loss's value and changes its gradient to the one of the paper's code
    (Nat-D/GMVAE, main.lua): while the batch's z-prior term is above lambda, that code adds the z-prior gradient
    with respect to p(z | l, w) to the conditional-prior term's and then negates the sum
    (``gradQz:add(...):mul(-1)``), so the conditional-prior term's gradient through p(z | l, w) has its sign
    flipped: it pushes each example's cluster weights towards the components whose KL is larger. That is the
    gradient the published MNIST accuracies were trained with; with the ELBO's own gradient ("elbo", the default)
    the MNIST runs put every digit in one cluster (README, GMVAE on MNIST). A batch-normalised encoder
    (``config.batch_norm``) is normalised with the statistics of each batch."""
    num_samples = check_num_samples(num_samples)
    if free_bits < 0:
        raise ValueError(f"the free-bits threshold lambda must be >= 0, got {free_bits}")
    if cluster_gradient not in CLUSTER_GRADIENTS:
        raise ValueError(f"cluster_gradient must be one of {CLUSTER_GRADIENTS}, got {cluster_gradient!r}")

    def loss_fn(params: Params, batch: jax.Array, key: jax.Array, step: jax.Array) -> tuple[jax.Array, Metrics]:
        del step
        params = model.with_stats(params, batch)
        keys = jax.random.split(key, batch.shape[0])
        terms, through_post = jax.vmap(lambda x, k: model._loss_terms(params, x, k, num_samples))(batch, keys)
        means = {k: jnp.mean(v) for k, v in terms.items()}
        loss = -means["rec"] + means["cond_prior"] + means["w_prior"] + jnp.maximum(means["z_prior"], free_bits)
        if cluster_gradient == "paper":  # zero in value; its gradient is -2x the part through p(z | l, w)
            t = jnp.mean(through_post)
            loss = loss + jnp.where(means["z_prior"] > free_bits, -2.0 * (t - jax.lax.stop_gradient(t)), 0.0)
        return loss, {**means, "loss": loss}

    return loss_fn


def make_gmvae_pretrain_loss(model: GMVAE) -> LossFn:
    """Batch loss of the autoencoder inside a GMVAE: ``-mean log p(x | l = E q(l | x))``, the encoder's l-means
    decoded deterministically (the autoencoder pretraining of VaDE and DEC). Only the encoder and the decoder get
    gradients; it prepares :func:`pretrained_init`."""

    def loss_fn(params: Params, batch: jax.Array, key: jax.Array, step: jax.Array) -> tuple[jax.Array, Metrics]:
        del key, step
        params = model.with_stats(params, batch)
        rec = jnp.mean(jax.vmap(lambda x: model.decode(params, model.encode(params, x)[1].mean()).log_prob(x))(batch))
        return -rec, {"loss": -rec, "rec": rec}

    return loss_fn


def pretrained_init(model: GMVAE, data: jax.Array, key: jax.Array, *, epochs: int = 60, batch_size: int = 100,
                    learning_rate: float = 1e-3, progress: bool = False) -> tuple[Params, dict[str, Any]]:
    """GMVAE parameters from autoencoder pretraining and a Gaussian mixture (VaDE-style initialisation).

    1. Train the encoder's l-means and the decoder as an autoencoder (:func:`make_gmvae_pretrain_loss`, Adam,
       ``epochs`` passes over ``data``).
    2. Fit a K-component diagonal Gaussian mixture (scikit-learn) to the posterior means of l over ``data``.
    3. Set p(l | w, z=k) to its k-th component for every w (:meth:`GMVAE.init_prior`).

    Returns ``(params, info)``; ``info`` holds the pretraining loss, the mixture and the training points'
    mixture assignments (``"assignments"``), against which the GMVAE's own clusters can be compared."""
    import numpy as np
    import optax
    from sklearn.mixture import GaussianMixture

    from dlvm_jax.train import fit, init_state

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    k_init, k_fit, k_gmm = jax.random.split(key, 3)
    optimizer = optax.adam(learning_rate)
    state = init_state(model.init(k_init), optimizer, k_fit)
    state, history = fit(state, data, loss_fn=make_gmvae_pretrain_loss(model), optimizer=optimizer,
                         batch_size=batch_size, epochs=epochs, eval_every=epochs, progress=progress)
    params = state.params

    # a batch-normalised encoder is normalised with the statistics of all of ``data``
    params_stats = jax.jit(model.with_stats)(params, data)
    l_means = jax.jit(jax.vmap(lambda p, x: model.encode(p, x)[1].mean(), in_axes=(None, 0)))
    latents = np.concatenate([np.asarray(l_means(params_stats, data[i:i + 10_000]))
                              for i in range(0, data.shape[0], 10_000)])
    mixture = GaussianMixture(model.config.clusters, covariance_type="diag", reg_covar=1e-4,
                              random_state=int(jax.random.randint(k_gmm, (), 0, 2**31 - 1)))
    assignments = mixture.fit_predict(latents)
    params = model.init_prior(params, mixture.means_, mixture.covariances_)
    return params, {"pretrain_loss": history[-1].get("train_loss"), "mixture": mixture,
                    "assignments": assignments.astype(np.int32)}
