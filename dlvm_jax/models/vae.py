"""Variational autoencoder as pure functions over a params pytree.

    p(z) = N(0, I),  p(x | z) = likelihood(decoder(z)),  q(z | x) = N(mu(x), diag sigma(x)^2).

Every function here works on ONE example ``x`` of shape ``config.data_shape``; lift with ``jax.vmap`` over a
batch (the objectives do).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dlvm_jax import distributions as dists
from dlvm_jax.networks import IMAGE_SHAPE, MLP, ConvDecoder, ConvEncoder

Params = Any
NETWORKS = ("mlp", "conv")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a VAE. Defaults: the one-stochastic-layer model of the IWAE paper (784-200-200-50 tanh)."""

    data_shape: tuple[int, ...] = (784,)
    latent_dim: int = 50
    hidden: tuple[int, ...] = (200, 200)
    activation: str = "tanh"
    likelihood: str = "bernoulli"
    network: str = "mlp"
    layer_norm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_shape", tuple(int(d) for d in self.data_shape))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        dists.check_likelihood(self.likelihood)
        if self.network not in NETWORKS:
            raise ValueError(f"unknown network {self.network!r}; choose one of {', '.join(NETWORKS)}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.network == "conv" and self.data_shape != IMAGE_SHAPE:
            raise ValueError(
                f"the conv networks need images of shape {IMAGE_SHAPE}, but data_shape is {self.data_shape}; "
                "use --network mlp or reshape the data"
            )

    @property
    def data_size(self) -> int:
        size = 1
        for d in self.data_shape:
            size *= d
        return size


class VAE:
    """A VAE: ``init``, ``encode``, ``decode``, ``prior``, ``log_weights``, all pure functions of ``params``."""

    def __init__(self, config: VAEConfig):
        self.config = config
        c = config
        out = dists.likelihood_param_size(c.likelihood, c.data_size)
        if c.network == "mlp":
            in_ndims = len(c.data_shape)
            self.encoder = MLP(c.hidden, 2 * c.latent_dim, c.activation, c.layer_norm, in_ndims=in_ndims)
            self.decoder = MLP(tuple(reversed(c.hidden)), out, c.activation, c.layer_norm)
        else:
            self.encoder = ConvEncoder(2 * c.latent_dim)
            self.decoder = ConvDecoder(channels_out=out // c.data_size)

    def __hash__(self) -> int:
        return hash(self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VAE) and other.config == self.config

    def init(self, key: jax.Array, data_mean: jax.Array | None = None) -> Params:
        """Initialise parameters. With ``data_mean`` (values in [0, 1]) the decoder's output bias starts at the
        logit of the mean (Bernoulli likelihoods, MLP decoder), as in the IWAE paper."""
        c = self.config
        k_enc, k_dec = jax.random.split(key)
        params = {
            "encoder": self.encoder.init(k_enc, jnp.zeros(c.data_shape))["params"],
            "decoder": self.decoder.init(k_dec, jnp.zeros((c.latent_dim,)))["params"],
        }
        if data_mean is not None and c.network == "mlp" and c.likelihood == "bernoulli":
            mean = jnp.clip(jnp.asarray(data_mean, jnp.float32).reshape(-1), 1e-3, 1 - 1e-3)
            last = sorted(k for k in params["decoder"] if k.startswith("Dense_"))[-1]
            params["decoder"][last]["bias"] = jnp.log(mean) - jnp.log1p(-mean)
        return params

    def encode(self, params: Params, x: jax.Array) -> dists.Distribution:
        """q(z | x): a diagonal Gaussian with event shape (latent_dim,)."""
        return dists.diag_gaussian_from_raw(self.encoder.apply({"params": params["encoder"]}, x))

    def decode(self, params: Params, z: jax.Array) -> dists.Distribution:
        """p(x | z) for z of shape (..., latent_dim); leading axes become batch axes."""
        out = self.decoder.apply({"params": params["decoder"]}, z)
        return dists.likelihood_dist(self.config.likelihood, out, self.config.data_shape)

    def prior(self, params: Params) -> dists.Distribution:
        """p(z) = N(0, I)."""
        del params
        return dists.standard_normal(self.config.latent_dim)

    def log_weights(
        self, params: Params, x: jax.Array, key: jax.Array, num_samples: int, *, stop_q_grad: bool = False
    ) -> jax.Array:
        """log w_m = log p(x | z_m) + log p(z_m) - log q(z_m | x), z_m ~ q(z | x); shape (num_samples,).

        ``stop_q_grad`` evaluates log q with its parameters held constant (the sticking-the-landing estimator).
        ``key`` may also be the standard-normal noise, shape (num_samples, latent_dim) (see
        :func:`dlvm_jax.distributions.sample`)."""
        q = self.encode(params, x)
        z = dists.sample(q, key, num_samples)
        log_q = self.encode(jax.lax.stop_gradient(params), x).log_prob(z) if stop_q_grad else q.log_prob(z)
        return self.decode(params, z).log_prob(x) + self.prior(params).log_prob(z) - log_q

    def sample(self, params: Params, key: jax.Array, num: int) -> jax.Array:
        """Means of p(x | z) for ``num`` draws z ~ p(z); shape (num, *data_shape)."""
        z = self.prior(params).sample(seed=key, sample_shape=num)
        return dists.likelihood_mean(self.decode(params, z))

    def reconstruct(self, params: Params, x: jax.Array) -> jax.Array:
        """Mean of p(x | z) at the posterior mean z = E_q[z] (one example)."""
        return dists.likelihood_mean(self.decode(params, self.encode(params, x).mean()))


__all__ = ["VAE", "VAEConfig", "NETWORKS"]
