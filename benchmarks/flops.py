"""Floating-point operations of the benchmarked models, counted from their layer shapes (pure Python).

Only the multiply-adds of dense and convolution layers are counted (2 FLOPs each): activations, likelihoods, KLs
and the optimizer are left out. Convolutions are counted as direct convolutions (every output pixel times the whole
kernel), in every framework alike, whatever algorithm runs them: dlvm_jax computes the conv VAE encoder's two
64 -> 64 layers in 1-D Winograd form (dlvm_jax.networks.conv3x3_by_patches), whose matmuls do two thirds of those
multiply-adds (the conv VAE's train step at M=1: 10.5 of the 13.4 GFLOP counted), so its FLOP/s from these counts
are effective rates, the direct convolution's work per second, and can exceed the arithmetic actually done.
A training step counts the forward pass and both backward products of every layer (gradient with respect to the
weights, and to the layer's input), except the input gradient of the encoder's first layer (its input is data).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    flops: int  #: forward FLOPs of one application (one example or one sample)
    first: bool = False  #: the network's first layer on data (no input gradient)


def dense(n_in: int, n_out: int, first: bool = False) -> Layer:
    return Layer(2 * n_in * n_out, first)


def conv(out_h: int, out_w: int, c_in: int, c_out: int, k: int = 3, first: bool = False) -> Layer:
    """A k x k convolution: every output pixel takes k*k*c_in inputs per output channel."""
    return Layer(2 * out_h * out_w * c_out * k * k * c_in, first)


def conv_transpose_s2(in_hw: int, c_in: int, c_out: int, k: int = 3) -> Layer:
    """A k x k, stride-2, "SAME" transposed convolution from in_hw x in_hw: each input pixel feeds k x k outputs,
    less the taps that land on the cropped last row and column (k * in_hw - 1 useful taps per axis for k = 3)."""
    taps = k * in_hw - (k - 2)
    return Layer(2 * c_in * c_out * taps * taps)


def mlp(sizes: list[int], first: bool = False) -> list[Layer]:
    return [dense(a, b, first and i == 0) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]


#: Per model: networks applied once per example ("per_example") and once per Monte Carlo sample ("per_sample").
MODELS: dict[str, dict[str, list[Layer]]] = {
    "mlp_vae": {
        "per_example": mlp([784, 200, 200, 100], first=True),
        "per_sample": mlp([50, 200, 200, 784]),
    },
    "conv_vae": {
        "per_example": [conv(28, 28, 1, 32, first=True), conv(14, 14, 32, 64), conv(14, 14, 64, 64),
                        conv(14, 14, 64, 64), dense(64 * 14 * 14, 32), dense(32, 4)],
        "per_sample": [dense(2, 64 * 14 * 14), conv_transpose_s2(14, 64, 32), conv(28, 28, 32, 1)],
    },
    "gmvae": {
        "per_example": mlp([2, 100, 8], first=True),
        "per_sample": mlp([2, 100, 20]) + mlp([2, 100, 4]),  # conditional prior network and decoder
    },
}


def forward(layers: list[Layer]) -> int:
    return sum(layer.flops for layer in layers)


def backward(layers: list[Layer]) -> int:
    return sum(layer.flops * (1 if layer.first else 2) for layer in layers)


def train_step_flops(model: str, batch_size: int, num_samples: int) -> int:
    """Forward and backward FLOPs of one training step."""
    m = MODELS[model]
    per_example = forward(m["per_example"]) + backward(m["per_example"])
    per_sample = forward(m["per_sample"]) + backward(m["per_sample"])
    return batch_size * (per_example + num_samples * per_sample)


def log_weight_flops(model: str, num_samples: int) -> float:
    """Forward FLOPs per log-weight of the importance-sampled log-likelihood with K = ``num_samples``: the
    per-sample networks, plus the encoder shared by the K samples of an example."""
    m = MODELS[model]
    return forward(m["per_sample"]) + forward(m["per_example"]) / num_samples
