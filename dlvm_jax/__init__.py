"""dlvm_jax: deep latent variable models (VAE, IWAE, GMVAE) as pure JAX/Flax functions."""

from dlvm_jax import (checkpoint, data, distributions, inference, likelihood, metrics, networks, objectives, parallel,
                      train)
from dlvm_jax.likelihood import ISEstimate, log_likelihood
from dlvm_jax.models import GMVAE, VAE, GMVAEConfig, LinearGaussian, LinearGaussianConfig, VAEConfig, make_gmvae_loss
from dlvm_jax.objectives import elbo, iwae, make_loss, microbatched
from dlvm_jax.train import TrainState, fit, fit_restarts, init_state, make_epoch, make_train_step

__version__ = "0.1.0"

__all__ = [
    "checkpoint", "data", "distributions", "inference", "likelihood", "metrics", "networks", "objectives",
    "parallel", "train",
    "GMVAE", "GMVAEConfig", "make_gmvae_loss", "fit_restarts",
    "ISEstimate", "log_likelihood", "VAE", "VAEConfig", "LinearGaussian", "LinearGaussianConfig",
    "elbo", "iwae", "make_loss", "microbatched", "TrainState", "fit", "init_state", "make_epoch", "make_train_step",
]
