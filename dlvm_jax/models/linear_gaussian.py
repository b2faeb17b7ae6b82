"""Linear-Gaussian model (factor analysis): exact log p(x) and exact posterior, the ground truth for estimators.

    p(z) = N(0, I_D),  p(x | z) = N(W z + b, diag psi),  so  p(x) = N(b, W W^T + diag psi),
    p(z | x) = N(S W^T Psi^{-1} (x - b), S),  S = (I + W^T Psi^{-1} W)^{-1}.

The amortised posterior q(z | x) = N(A x + c, L L^T) is linear-Gaussian with a full lower-triangular scale, so
it CAN equal the exact posterior (:meth:`LinearGaussian.exact_encoder`), and any other setting is mis-specified.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from dlvm_jax import distributions as dists

Params = Any


@dataclasses.dataclass(frozen=True)
class LinearGaussianConfig:
    data_dim: int = 5
    latent_dim: int = 2


class LinearGaussian:
    """Factor analysis with an amortised full-covariance Gaussian q(z | x); same interface as :class:`VAE`."""

    def __init__(self, config: LinearGaussianConfig):
        self.config = config

    def __hash__(self) -> int:
        return hash(self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearGaussian) and other.config == self.config

    def init(self, key: jax.Array) -> Params:
        """Random generative parameters and a deliberately crude encoder (q(z|x) = N(0.5 A* x, I))."""
        d, k = self.config.data_dim, self.config.latent_dim
        kw, kb, kp = jax.random.split(key, 3)
        gen = {
            "W": jax.random.normal(kw, (d, k)),
            "b": 0.5 * jax.random.normal(kb, (d,)),
            "log_psi": jnp.log(0.2 + jax.random.uniform(kp, (d,))),
        }
        exact = self.exact_encoder(gen)
        enc = {"A": 0.5 * exact["A"], "c": exact["c"], "L": jnp.eye(k)}
        return {"generative": gen, "encoder": enc}

    # -- model -------------------------------------------------------------------------------------------------
    def prior(self, params: Params) -> dists.Distribution:
        del params
        return dists.standard_normal(self.config.latent_dim)

    def decode(self, params: Params, z: jax.Array) -> dists.Distribution:
        g = params["generative"]
        loc = z @ g["W"].T + g["b"]
        return dists.diag_gaussian(loc, jnp.broadcast_to(jnp.exp(0.5 * g["log_psi"]), loc.shape))

    def encode(self, params: Params, x: jax.Array) -> dists.Distribution:
        e = params["encoder"]
        return dists.full_gaussian(e["A"] @ x + e["c"], jnp.tril(e["L"]))

    def log_weights(
        self, params: Params, x: jax.Array, key: jax.Array, num_samples: int, *, stop_q_grad: bool = False
    ) -> jax.Array:
        q = self.encode(params, x)
        z = dists.sample(q, key, num_samples)  # key: a PRNG key or the noise itself
        log_q = self.encode(jax.lax.stop_gradient(params), x).log_prob(z) if stop_q_grad else q.log_prob(z)
        return self.decode(params, z).log_prob(x) + self.prior(params).log_prob(z) - log_q

    # -- closed forms --------------------------------------------------------------------------------------------
    def marginal_covariance(self, params: Params) -> jax.Array:
        g = params["generative"]
        return g["W"] @ g["W"].T + jnp.diag(jnp.exp(g["log_psi"]))

    def exact_log_prob(self, params: Params, x: jax.Array) -> jax.Array:
        """Exact log p(x) = log N(x; b, W W^T + diag psi) for one example."""
        g = params["generative"]
        cov = self.marginal_covariance(params)
        chol = jnp.linalg.cholesky(cov)
        r = jax.scipy.linalg.solve_triangular(chol, x - g["b"], lower=True)
        d = x.shape[-1]
        return -0.5 * (d * math.log(2 * math.pi) + 2 * jnp.sum(jnp.log(jnp.diag(chol))) + r @ r)

    def exact_encoder(self, gen: Params) -> Params:
        """Encoder parameters for which q(z | x) is exactly p(z | x) (given the generative parameters ``gen``)."""
        k = self.config.latent_dim
        wt_pinv = gen["W"].T * jnp.exp(-gen["log_psi"])  # W^T Psi^{-1}
        cov = jnp.linalg.inv(jnp.eye(k) + wt_pinv @ gen["W"])
        cov = 0.5 * (cov + cov.T)
        a = cov @ wt_pinv
        return {"A": a, "c": -a @ gen["b"], "L": jnp.linalg.cholesky(cov)}

    def sample_data(self, params: Params, key: jax.Array, num: int) -> jax.Array:
        """Draw ``num`` points x ~ p(x)."""
        kz, kx = jax.random.split(key)
        z = self.prior(params).sample(seed=kz, sample_shape=num)
        return self.decode(params, z).sample(seed=kx)
