"""Flax linen networks: arrays in, arrays out. No randomness and no state inside.

Every module works on one example (no batch axis) or on any number of leading batch axes, so models can be
written per example and lifted with ``jax.vmap``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": nn.relu,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "swish": nn.swish,
}

IMAGE_SHAPE = (28, 28, 1)


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """Multi-layer perceptron: ``hidden`` widths with ``activation`` (and optional LayerNorm), then a linear
    layer of width ``out``. Inputs of any shape are flattened over their trailing ``in_ndims`` axes."""

    hidden: Sequence[int]
    out: int
    activation: str = "tanh"
    layer_norm: bool = False
    in_ndims: int = 1
    out_bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        lead = x.shape[: x.ndim - self.in_ndims]
        h = x.reshape(lead + (-1,))
        for width in self.hidden:
            h = nn.Dense(width)(h)
            if self.layer_norm:
                h = nn.LayerNorm()(h)
            h = act(h)
        return nn.Dense(self.out, bias_init=self.out_bias_init)(h)


def _check_image(x: jax.Array, name: str) -> None:
    if x.shape[-3:] != IMAGE_SHAPE:
        raise ValueError(
            f"{name} expects images of shape {IMAGE_SHAPE} (height, width, channels), got trailing shape "
            f"{tuple(x.shape[-3:])}; reshape the data to (N, 28, 28, 1) or use the MLP networks"
        )


class ConvEncoder(nn.Module):
    """Convolutional encoder for 28x28x1 images: conv 32 -> 64 (stride 2) -> 64 -> 64, dense ``hidden``, then a
    linear layer of width ``out`` (the binarized-MNIST VAE of the seeds, output 14x14 after the strided conv)."""

    out: int
    hidden: int = 32
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x, "ConvEncoder")
        act = get_activation(self.activation)
        lead = x.shape[:-3]
        h = x.reshape((-1,) + IMAGE_SHAPE)
        h = act(nn.Conv(32, (3, 3), padding="SAME")(h))
        h = act(nn.Conv(64, (3, 3), strides=(2, 2), padding="SAME")(h))
        h = act(nn.Conv(64, (3, 3), padding="SAME")(h))
        h = act(nn.Conv(64, (3, 3), padding="SAME")(h))
        h = h.reshape(h.shape[0], -1)
        h = act(nn.Dense(self.hidden)(h))
        return nn.Dense(self.out)(h).reshape(lead + (self.out,))


class ConvDecoder(nn.Module):
    """Convolutional decoder to 28x28 images: dense 14x14x64, transposed conv 32 (stride 2) to 28x28, then a
    3x3 conv to ``channels_out`` output maps (1 for Bernoulli logits, 2 for a Gaussian's mean and scale).
    Returns flat outputs of size 784 * ``channels_out`` (channel-major), as :mod:`distributions` expects."""

    channels_out: int = 1
    activation: str = "relu"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        lead = z.shape[:-1]
        h = act(nn.Dense(14 * 14 * 64)(z.reshape((-1, z.shape[-1]))))
        h = h.reshape((-1, 14, 14, 64))
        h = act(nn.ConvTranspose(32, (3, 3), strides=(2, 2), padding="SAME")(h))
        h = nn.Conv(self.channels_out, (3, 3), padding="SAME")(h)  # (n, 28, 28, C)
        h = jnp.moveaxis(h, -1, 1)  # channel-major so that a Gaussian's [loc, scale] split is contiguous
        return h.reshape(lead + (-1,))
