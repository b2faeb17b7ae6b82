r"""PyTorch reference implementations of dlvm_jax's models, for the benchmark and the parity tests.

Idiomatic, vectorised PyTorch (``nn.Module``, ``torch.distributions``; no Python loops over samples, clusters or
batch elements), written to be a fair opponent:

* :func:`mlp_vae`: the Bernoulli MLP VAE of the IWAE paper, 784-200-200-50 (tanh), like
  ``VAE(VAEConfig())``.
* :func:`conv_vae`: the convolutional VAE of the binarized-MNIST experiment (2-D latent, Bernoulli), like
  ``VAE(VAEConfig(data_shape=(28, 28, 1), latent_dim=2, network="conv"))``; images are NCHW here.
* :class:`GMVAE`: the Gaussian-mixture VAE of the spiral experiment, like ``GMVAE(GMVAEConfig())``.

Shapes: a batch of B examples, M Monte Carlo samples, latent size D. Samples are ``(M, B, D)``; the noise can be
given (``eps``, standard normal of that shape) so that a test can feed both frameworks the same draws, or is drawn
with ``torch.randn``. Per-example objectives return shape ``(B,)``.

:func:`load_vae_params` and :func:`load_gmvae_params` copy a dlvm_jax params pytree (nested dicts of arrays, as
numpy) into these modules. The conventions they bridge:

* Dense: flax kernels are (in, out), torch weights (out, in).
* Conv: flax kernels are HWIO, torch weights OIHW; both compute a cross-correlation.
* Flax's stride-2 "SAME" convolution of a 28x28 input pads 0 rows before and 1 after (total padding 1, the extra
  row at the end); torch's ``padding=1`` would pad 1 on both sides, so the encoder pads (0, 1) explicitly.
* Flax's transposed convolution (``transpose_kernel=False``) does not flip its kernel; torch's
  ``ConvTranspose2d`` (weights (in, out, kH, kW)) is the gradient of a convolution, i.e. flipped. For 3x3,
  stride 2, "SAME" on 14x14 inputs flax produces the first 28 rows and columns of torch's ``padding=0`` output
  (29x29) with the kernel flipped in both spatial axes.
* Flax flattens NHWC feature maps (h, w, c) into the encoder's dense layer and reshapes the decoder's dense output
  as (h, w, c); torch flattens NCHW (c, h, w): the dense weights are permuted accordingly.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributions as D
import torch.nn.functional as F
from torch import nn

#: Smallest standard deviation of a learned Gaussian scale (dlvm_jax.distributions.MIN_SCALE).
MIN_SCALE = 1e-3
IMAGE_SHAPE_NCHW = (1, 28, 28)

# Argument validation costs several checks per distribution object in eager mode; dlvm_jax validates nothing
# inside its jitted code either, so it is off for both sides of the comparison.
D.Distribution.set_default_validate_args(False)


def diag_gaussian(raw: torch.Tensor) -> D.Independent:
    """Diagonal Gaussian from ``raw = [loc, raw_scale]`` on the last axis; scale = softplus(raw_scale) + 1e-3."""
    loc, raw_scale = raw.chunk(2, dim=-1)
    return D.Independent(D.Normal(loc, F.softplus(raw_scale) + MIN_SCALE), 1)


def standard_normal(dim: int, like: torch.Tensor) -> D.Independent:
    zeros = like.new_zeros(dim)
    return D.Independent(D.Normal(zeros, torch.ones_like(zeros)), 1)


def mlp(sizes: list[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def reparameterize(q: D.Independent, num_samples: int, eps: torch.Tensor | None) -> torch.Tensor:
    """``num_samples`` reparameterised draws from a diagonal Gaussian, shape (M, B, D); ``eps`` standard normal
    noise of that shape, or None to draw it."""
    if eps is None:
        return q.rsample((num_samples,))
    return q.base_dist.loc + q.base_dist.scale * eps


# ----------------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------------


class ConvEncoder(nn.Module):
    """conv 32 -> 64 (stride 2) -> 64 -> 64 (3x3, relu), dense 32 (relu), dense ``out``; input (N, 1, 28, 28)."""

    def __init__(self, out: int, hidden: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2)  # padded (0, 1) by hand: "SAME" as in flax / TensorFlow
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 14 * 14, hidden)
        self.out = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        h = F.relu(self.conv1(x.reshape((-1,) + IMAGE_SHAPE_NCHW)))
        h = F.relu(self.conv2(F.pad(h, (0, 1, 0, 1))))
        h = F.relu(self.conv3(h))
        h = F.relu(self.conv4(h))
        h = F.relu(self.fc(h.flatten(1)))
        return self.out(h).reshape(lead + (-1,))


class ConvDecoder(nn.Module):
    """dense 64x14x14 (relu), transposed conv 32 (3x3, stride 2, relu) to 28x28, conv 3x3 to ``channels`` maps."""

    def __init__(self, latent_dim: int, channels: int = 1):
        super().__init__()
        self.fc = nn.Linear(latent_dim, 64 * 14 * 14)
        self.deconv = nn.ConvTranspose2d(64, 32, 3, stride=2)  # 29x29, cropped to 28x28 ("SAME" as in flax)
        self.conv = nn.Conv2d(32, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = F.relu(self.fc(z.reshape(-1, z.shape[-1]))).reshape(-1, 64, 14, 14)
        h = F.relu(self.deconv(h)[:, :, :28, :28])
        h = self.conv(h)
        return h.reshape(lead + h.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------


class VAE(nn.Module):
    """p(z) = N(0, I), p(x | z) = Bernoulli(logits = decoder(z)), q(z | x) = N(mu(x), diag sigma(x)^2)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, data_shape: tuple[int, ...]):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.data_shape = tuple(data_shape)

    def encode(self, x: torch.Tensor) -> D.Independent:
        return diag_gaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> D.Independent:
        logits = self.decoder(z).reshape(z.shape[:-1] + self.data_shape)
        return D.Independent(D.Bernoulli(logits=logits), len(self.data_shape))

    def prior(self, like: torch.Tensor) -> D.Independent:
        return standard_normal(self.latent_dim, like)

    def elbo(self, x: torch.Tensor, num_samples: int = 1, eps: torch.Tensor | None = None) -> torch.Tensor:
        """(1/M) sum_m log p(x | z_m) - KL(q(z|x) || p(z)) (analytic KL), shape (B,)."""
        q = self.encode(x)
        z = reparameterize(q, num_samples, eps)
        rec = self.decode(z).log_prob(x).mean(0)
        return rec - D.kl_divergence(q, self.prior(x))

    def log_weights(self, x: torch.Tensor, num_samples: int = 1, eps: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | z_m) + log p(z_m) - log q(z_m | x), shape (M, B)."""
        q = self.encode(x)
        z = reparameterize(q, num_samples, eps)
        return self.decode(z).log_prob(x) + self.prior(x).log_prob(z) - q.log_prob(z)

    def iwae(self, x: torch.Tensor, num_samples: int, eps: torch.Tensor | None = None) -> torch.Tensor:
        """logsumexp_m log w_m - log M, shape (B,)."""
        return torch.logsumexp(self.log_weights(x, num_samples, eps), 0) - math.log(num_samples)

    def loss(self, x: torch.Tensor, objective: str = "elbo", num_samples: int = 1,
             eps: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the batch mean of the objective (``"elbo"`` or ``"iwae"``)."""
        value = self.iwae(x, num_samples, eps) if objective == "iwae" else self.elbo(x, num_samples, eps)
        return -value.mean()


def mlp_vae(data_dim: int = 784, hidden: tuple[int, ...] = (200, 200), latent_dim: int = 50) -> VAE:
    """The Bernoulli MLP VAE (784-200-200-50, tanh)."""
    encoder = mlp([data_dim, *hidden, 2 * latent_dim])
    decoder = mlp([latent_dim, *reversed(hidden), data_dim])
    return VAE(encoder, decoder, latent_dim, (data_dim,))


def conv_vae(latent_dim: int = 2) -> VAE:
    """The Bernoulli convolutional VAE on (N, 1, 28, 28) images."""
    return VAE(ConvEncoder(2 * latent_dim), ConvDecoder(latent_dim, 1), latent_dim, IMAGE_SHAPE_NCHW)


# ----------------------------------------------------------------------------------------------------------------
# GMVAE
# ----------------------------------------------------------------------------------------------------------------


class GMVAE(nn.Module):
    r"""Gaussian-mixture VAE (Dilokthanakul et al. 2016), the loss of dlvm_jax.models.gmvae:

    w ~ N(0, I), z ~ Cat(1/K), l | w, z=k ~ N(mu_k(w), sigma_k(w)^2), x | l ~ N(decoder(l)); q(w|x) q(l|x) from
    one encoder, p(z | l, w) in closed form.
    """

    def __init__(self, data_dim: int = 2, clusters: int = 5, local_dim: int = 2, global_dim: int = 2,
                 hidden: int = 100, prior_hidden: int = 100):
        super().__init__()
        self.clusters, self.local_dim, self.global_dim = clusters, local_dim, global_dim
        self.encoder = mlp([data_dim, hidden, 2 * (global_dim + local_dim)])
        self.prior_net = mlp([global_dim, prior_hidden, 2 * clusters * local_dim])
        self.decoder = mlp([local_dim, hidden, 2 * data_dim])
        self.log_pi = -math.log(clusters)

    def encode(self, x: torch.Tensor) -> tuple[D.Independent, D.Independent]:
        w_raw, l_raw = self.encoder(x).split([2 * self.global_dim, 2 * self.local_dim], dim=-1)
        return diag_gaussian(w_raw), diag_gaussian(l_raw)

    def decode(self, l: torch.Tensor) -> D.Independent:
        return diag_gaussian(self.decoder(l))

    def conditional_prior(self, w: torch.Tensor) -> D.Independent:
        """p(l | w, z=k) for all k: batch shape (..., K), event (local_dim,)."""
        out = self.prior_net(w).unflatten(-1, (self.clusters, 2 * self.local_dim))
        return diag_gaussian(out)

    def _samples(self, x: torch.Tensor, num_samples: int, eps_w: torch.Tensor | None,
                 eps_l: torch.Tensor | None):
        q_w, q_l = self.encode(x)
        return q_w, q_l, reparameterize(q_w, num_samples, eps_w), reparameterize(q_l, num_samples, eps_l)

    def loss_terms(self, x: torch.Tensor, num_samples: int = 1, eps_w: torch.Tensor | None = None,
                   eps_l: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example terms, shape (B,): ``rec``, ``cond_prior``, ``w_prior``, ``z_prior`` and ``elbo``."""
        q_w, q_l, w, l = self._samples(x, num_samples, eps_w, eps_l)  # (M, B, D)
        rec = self.decode(l).log_prob(x).mean(0)
        cond = self.conditional_prior(w)  # batch (M, B, K)
        log_joint = self.log_pi + cond.log_prob(l.unsqueeze(-2))
        post = log_joint.softmax(-1)
        log_post = log_joint.log_softmax(-1)
        q_l_k = D.Independent(D.Normal(q_l.base_dist.loc.unsqueeze(-2), q_l.base_dist.scale.unsqueeze(-2)), 1)
        kl_l = D.kl_divergence(q_l_k, cond)  # (M, B, K)
        cond_prior = (post * kl_l).sum(-1).mean(0)
        w_prior = D.kl_divergence(q_w, standard_normal(self.global_dim, x))
        z_prior = (post * (log_post - self.log_pi)).sum(-1).mean(0)
        return {"rec": rec, "cond_prior": cond_prior, "w_prior": w_prior, "z_prior": z_prior,
                "elbo": rec - cond_prior - w_prior - z_prior}

    def loss(self, x: torch.Tensor, num_samples: int = 1, free_bits: float = 0.5,
             eps_w: torch.Tensor | None = None, eps_l: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the ELBO, batch mean, with the z-prior term's batch mean clamped below at ``free_bits``."""
        t = self.loss_terms(x, num_samples, eps_w, eps_l)
        return (-t["rec"].mean() + t["cond_prior"].mean() + t["w_prior"].mean()
                + torch.clamp(t["z_prior"].mean(), min=free_bits))

    def log_weights(self, x: torch.Tensor, num_samples: int = 1, eps_w: torch.Tensor | None = None,
                    eps_l: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x, l, w) - log q(l, w | x) with z summed out, shape (M, B)."""
        q_w, q_l, w, l = self._samples(x, num_samples, eps_w, eps_l)
        log_p_l = torch.logsumexp(self.log_pi + self.conditional_prior(w).log_prob(l.unsqueeze(-2)), -1)
        log_p = self.decode(l).log_prob(x) + log_p_l + standard_normal(self.global_dim, x).log_prob(w)
        return log_p - q_w.log_prob(w) - q_l.log_prob(l)


# ----------------------------------------------------------------------------------------------------------------
# Importance-sampled log-likelihood
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def log_likelihood(model: nn.Module, x: torch.Tensor, num_samples: int = 5000, chunk_size: int = 500,
                   eps: Any = None) -> torch.Tensor:
    """log (1/K) sum_k w_k for every example of the batch ``x``, shape (B,). The K samples are drawn
    ``chunk_size`` at a time (memory bounded by B * chunk_size decoder outputs) and reduced with a running
    logsumexp. ``eps``: None (draw), a tensor (K, B, D) for a VAE, or a pair of them (w, l) for the GMVAE."""
    total = None
    for start in range(0, num_samples, chunk_size):
        m = min(chunk_size, num_samples - start)
        if eps is None:
            log_w = model.log_weights(x, m)
        elif isinstance(eps, tuple):
            log_w = model.log_weights(x, m, eps[0][start:start + m], eps[1][start:start + m])
        else:
            log_w = model.log_weights(x, m, eps[start:start + m])
        part = torch.logsumexp(log_w, 0)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(num_samples)


# ----------------------------------------------------------------------------------------------------------------
# Weights from dlvm_jax params (numpy arrays)
# ----------------------------------------------------------------------------------------------------------------


def _t(a: Any) -> torch.Tensor:
    a = np.asarray(a)
    return torch.from_numpy(np.array(a, dtype=np.float64 if a.dtype == np.float64 else np.float32, copy=True))


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"shape mismatch: torch {tuple(param.shape)} vs converted {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def load_dense(layer: nn.Linear, p: Mapping[str, Any]) -> None:
    _copy(layer.weight, _t(p["kernel"]).T)
    _copy(layer.bias, _t(p["bias"]))


def load_conv(layer: nn.Conv2d, p: Mapping[str, Any]) -> None:
    _copy(layer.weight, _t(p["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
    _copy(layer.bias, _t(p["bias"]))


def load_conv_transpose(layer: nn.ConvTranspose2d, p: Mapping[str, Any]) -> None:
    _copy(layer.weight, _t(p["kernel"]).flip(0, 1).permute(2, 3, 0, 1))  # HWIO, unflipped -> (I, O, H, W), flipped
    _copy(layer.bias, _t(p["bias"]))


def load_mlp(seq: nn.Sequential, p: Mapping[str, Any]) -> None:
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    names = sorted((k for k in p if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
    if len(names) != len(linears):
        raise ValueError(f"{len(names)} dense layers in the params, {len(linears)} in the torch network")
    for layer, name in zip(linears, names):
        load_dense(layer, p[name])


def load_vae_params(model: VAE, params: Mapping[str, Any]) -> VAE:
    """Copy dlvm_jax VAE params (MLP or conv networks) into ``model``; returns it."""
    enc, dec = params["encoder"], params["decoder"]
    if isinstance(model.encoder, nn.Sequential):
        load_mlp(model.encoder, enc)
        load_mlp(model.decoder, dec)
        return model
    e, d = model.encoder, model.decoder
    for layer, name in zip((e.conv1, e.conv2, e.conv3, e.conv4), ("Conv_0", "Conv_1", "Conv_2", "Conv_3")):
        load_conv(layer, enc[name])
    # Encoder dense after the convs: flax rows are (h, w, c), torch columns (c, h, w).
    k = np.asarray(enc["Dense_0"]["kernel"]).reshape(14, 14, 64, -1).transpose(3, 2, 0, 1).reshape(-1, 64 * 14 * 14)
    _copy(e.fc.weight, _t(k))
    _copy(e.fc.bias, _t(enc["Dense_0"]["bias"]))
    load_dense(e.out, enc["Dense_1"])
    # Decoder dense before the transposed conv: flax outputs (h, w, c), torch (c, h, w).
    k = np.asarray(dec["Dense_0"]["kernel"])
    _copy(d.fc.weight, _t(k.reshape(-1, 14, 14, 64).transpose(3, 1, 2, 0).reshape(64 * 14 * 14, -1)))
    _copy(d.fc.bias, _t(np.asarray(dec["Dense_0"]["bias"]).reshape(14, 14, 64).transpose(2, 0, 1).reshape(-1)))
    load_conv_transpose(d.deconv, dec["ConvTranspose_0"])
    load_conv(d.conv, dec["Conv_0"])
    return model


def load_gmvae_params(model: GMVAE, params: Mapping[str, Any]) -> GMVAE:
    """Copy dlvm_jax GMVAE params into ``model``; returns it."""
    load_mlp(model.encoder, params["encoder"])
    load_mlp(model.prior_net, params["prior"])
    load_mlp(model.decoder, params["decoder"])
    return model


def jax_grads_like(model: nn.Module, grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """dlvm_jax gradients (same pytree layout as the params) in the layout of ``model.named_parameters()``,
    by loading them into a copy of the model (the maps above are linear, so they carry gradients too)."""
    clone = copy.deepcopy(model)
    (load_gmvae_params if isinstance(clone, GMVAE) else load_vae_params)(clone, grads)
    return {name: p.detach().numpy().copy() for name, p in clone.named_parameters()}


__all__ = ["VAE", "GMVAE", "mlp_vae", "conv_vae", "log_likelihood", "load_vae_params", "load_gmvae_params",
           "jax_grads_like", "diag_gaussian"]
