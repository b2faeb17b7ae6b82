"""Models: pure functions (init, encode, decode, prior, log_weights) over a params pytree."""

from dlvm_jax.models.gmvae import GMVAE, GMVAEConfig, make_gmvae_loss
from dlvm_jax.models.linear_gaussian import LinearGaussian, LinearGaussianConfig
from dlvm_jax.models.vae import VAE, VAEConfig

__all__ = ["VAE", "VAEConfig", "GMVAE", "GMVAEConfig", "make_gmvae_loss", "LinearGaussian", "LinearGaussianConfig"]
