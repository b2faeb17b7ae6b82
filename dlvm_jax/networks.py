"""Flax linen networks: arrays in, arrays out. No randomness and no state inside.

Every module works on one example (no batch axis) or on any number of leading batch axes, so models can be
written per example and lifted with ``jax.vmap``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


#: Activations whose derivative is a function of their output. :func:`conv3x3_by_patches` and :func:`transpose2x`
#: apply these inside their blocks, with the bias: the backward pass needs only the layer's output, and no pass over
#: whole activation maps is left outside the blocks. Other activations are applied after the layer.
OUTPUT_DERIVATIVES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": lambda y: (y > 0).astype(y.dtype),  # nn.relu's derivative at 0 is 0 too
    "tanh": lambda y: 1 - y * y,
}


def _check_fused_activation(name: str, activation: str | None) -> None:
    if activation is not None and activation not in OUTPUT_DERIVATIVES:
        raise ValueError(f"{name} applies only the activations {', '.join(OUTPUT_DERIVATIVES)} (their derivatives "
                         f"are functions of their outputs), got {activation!r}; apply others to its output")


#: Dense layers with at most this many inputs multiply-add instead of calling a matmul (see :func:`few_inputs_dot`),
#: and so do the forward passes of patch-form convolutions with at most this many input channels
#: (:func:`_conv_by_multiply_add`).
FEW_INPUTS = 2


@jax.custom_vjp
def _multiply_add(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return functools.reduce(jnp.add, [lhs[..., i, None] * rhs[i] for i in range(rhs.shape[0])])


def _multiply_add_fwd(lhs: jax.Array, rhs: jax.Array):
    return _multiply_add(lhs, rhs), (lhs, rhs)


def _multiply_add_bwd(res, g):
    # The backward pass as the two matmuls of a Dense layer: differentiating the multiply-adds instead would give
    # one reduction per input, which made the spiral GMVAE's train step 3x slower.
    lhs, rhs = res
    return jnp.einsum("...n,kn->...k", g, rhs), jnp.einsum("...k,...n->kn", lhs, g)


_multiply_add.defvjp(_multiply_add_fwd, _multiply_add_bwd)


def few_inputs_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                   preferred_element_type=None) -> jax.Array:
    """``lhs @ rhs`` of a Dense layer (contract the last axis of ``lhs`` with the first of ``rhs``) written as
    ``sum_i lhs[..., i, None] * rhs[i]`` in the forward pass (its gradient is the usual pair of matmuls): the
    ``dot_general`` of :class:`MLP` layers with at most :data:`FEW_INPUTS` inputs.

    A matmul with a couple of inputs per row does almost no arithmetic per byte, and XLA's CPU backend runs it as a
    library call that cannot fuse with the bias and activation after it; as multiply-adds the layer becomes one
    fused elementwise kernel. ``python -m benchmarks.profile_small_ops`` (10,000 rows, 100 outputs, tanh): forward
    1.0 ms against 0.6 ms with 2 inputs (1.8 against 0.6 with 4), while forward + backward are even at 2 inputs and
    slower this way from 4 on, hence :data:`FEW_INPUTS` = 2 (the spiral GMVAE's 2-D data and latents, the 2-D latent
    of the conv VAE). The same numbers up to float rounding order."""
    del precision, preferred_element_type
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch or rhs_batch or rhs.ndim != 2:
        raise ValueError(f"few_inputs_dot handles a Dense layer's contraction only, got {dimension_numbers}")
    return _multiply_add(lhs, rhs)


def dense(features: int, num_inputs: int, **kwargs) -> nn.Dense:
    """``nn.Dense(features)``, with :func:`few_inputs_dot` when it has at most :data:`FEW_INPUTS` inputs (same
    parameters, same names)."""
    if num_inputs <= FEW_INPUTS:
        kwargs["dot_general"] = few_inputs_dot
    return nn.Dense(features, **kwargs)


class BatchNorm(nn.Module):
    """Batch normalisation with its statistics passed in, not kept as state: ``(h - mean) / sqrt(var + eps)``,
    then a learned per-feature scale and shift.

    With ``stats=None`` the mean and variance are those of ``h`` over all its leading axes (the batch, training
    mode; gradients flow through them) and are recorded with ``sow`` in the ``"batch_stats"`` collection, so
    ``apply(..., mutable=["batch_stats"])`` returns them. With ``stats={"mean": ..., "var": ...}`` (e.g. the
    population statistics of the training set) it normalises a single example as well as a batch."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, h: jax.Array, stats: dict[str, jax.Array] | None = None) -> jax.Array:
        if stats is None:
            if h.ndim < 2:
                raise ValueError("batch normalisation without statistics needs a batch (a leading axis); pass "
                                 "the population statistics to normalise a single example")
            axes = tuple(range(h.ndim - 1))
            mean = jnp.mean(h, axes)
            var = jnp.mean(jnp.square(h - mean), axes)
            self.sow("batch_stats", "stats", {"mean": mean, "var": var})
        else:
            mean, var = stats["mean"], stats["var"]
        scale = self.param("scale", nn.initializers.ones, (h.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (h.shape[-1],))
        return (h - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class MLP(nn.Module):
    """Multi-layer perceptron: ``hidden`` widths with ``activation`` (and optional LayerNorm or batch
    normalisation before it), then a linear layer of width ``out``. Inputs of any shape are flattened over their
    trailing ``in_ndims`` axes.

    With ``batch_norm`` the hidden layers have no bias (the normalisation's shift replaces it) and ``__call__``
    takes ``stats``, one ``{"mean", "var"}`` per hidden layer; without them it normalises with the statistics of
    the batch and :meth:`batch_stats` returns those (see :class:`BatchNorm`)."""

    hidden: Sequence[int]
    out: int
    activation: str = "tanh"
    layer_norm: bool = False
    batch_norm: bool = False
    in_ndims: int = 1
    out_bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, stats: Sequence[dict[str, jax.Array]] | None = None) -> jax.Array:
        if self.layer_norm and self.batch_norm:
            raise ValueError("choose layer_norm or batch_norm, not both")
        if stats is not None and len(stats) != len(self.hidden):
            raise ValueError(f"stats must hold one entry per hidden layer ({len(self.hidden)}), got {len(stats)}")
        act = get_activation(self.activation)
        lead = x.shape[: x.ndim - self.in_ndims]
        h = x.reshape(lead + (-1,))
        for i, width in enumerate(self.hidden):
            h = dense(width, h.shape[-1], use_bias=not self.batch_norm)(h)
            if self.layer_norm:
                h = nn.LayerNorm()(h)
            if self.batch_norm:
                h = BatchNorm(name=f"BatchNorm_{i}")(h, None if stats is None else stats[i])
            h = act(h)
        return dense(self.out, h.shape[-1], bias_init=self.out_bias_init)(h)

    def batch_stats(self, variables: dict[str, Any], x: jax.Array) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """``(output, stats)`` of a batch-normalised MLP on the batch ``x``: the statistics each hidden layer
        normalised with (differentiable), in the form ``__call__`` takes them."""
        if not self.batch_norm:
            raise ValueError("batch_stats needs an MLP with batch_norm=True")
        out, state = self.apply(variables, x, mutable=["batch_stats"])
        sown = state["batch_stats"]
        return out, [sown[f"BatchNorm_{i}"]["stats"][0] for i in range(len(self.hidden))]


def _check_image(x: jax.Array, name: str) -> None:
    if x.shape[-3:] != IMAGE_SHAPE:
        raise ValueError(
            f"{name} expects images of shape {IMAGE_SHAPE} (height, width, channels), got trailing shape "
            f"{tuple(x.shape[-3:])}; reshape the data to (N, 28, 28, 1) or use the MLP networks"
        )


class ConvEncoder(nn.Module):
    """Convolutional encoder for 28x28x1 images: conv 32 -> 64 (stride 2) -> 64 -> 64, dense ``hidden``, then a
    linear layer of width ``out`` (the binarized-MNIST VAE of the seeds, output 14x14 after the strided conv).

    ``convs="patches"`` (default) computes the convolutions as blocked matmuls onto patches (:class:`PatchConv`; the
    1-D Winograd form of row patches for the 64 -> 64 layers), measured faster on XLA's CPU backend (2 cores, batch
    100, vmapped per example as the losses run it: 90.8 ms forward+backward against 140.6 ms, ``python -m
    benchmarks.profile_conv``, 2026-12-06), with the bias and a relu or tanh activation applied inside its blocks;
    ``convs="xla"`` leaves them to XLA's convolutions and their autodiff (e.g. on a GPU, or for second derivatives
    and forward mode: the patch form defines reverse-mode derivatives only).
    The parameters (``nn.Conv``'s, named Conv_0 to Conv_3) and the function are the same either way."""

    out: int
    hidden: int = 32
    activation: str = "relu"
    convs: str = "patches"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_image(x, "ConvEncoder")
        if self.convs not in ("patches", "xla"):
            raise ValueError(f"ConvEncoder convs must be 'patches' or 'xla', got {self.convs!r}")
        act = get_activation(self.activation)

        # The patch form applies the bias and the activation inside its blocks where it can (OUTPUT_DERIVATIVES).
        fused = self.convs == "patches" and self.activation in OUTPUT_DERIVATIVES

        def conv(features: int, stride: int, index: int) -> Callable[[jax.Array], jax.Array]:
            if fused:
                return PatchConv(features, stride, self.activation, name=f"Conv_{index}")
            if self.convs == "patches":
                layer = PatchConv(features, stride, name=f"Conv_{index}")
            else:
                layer = nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME", name=f"Conv_{index}")
            return lambda h: act(layer(h))

        lead = x.shape[:-3]
        h = x.reshape((-1,) + IMAGE_SHAPE)
        for index, (features, stride) in enumerate([(32, 1), (64, 2), (64, 1), (64, 1)]):
            h = conv(features, stride, index)(h)
        h = h.reshape(h.shape[0], -1)
        h = act(nn.Dense(self.hidden)(h))
        return nn.Dense(self.out)(h).reshape(lead + (self.out,))


# Convolutions as matmuls onto "tap maps". XLA's CPU backend runs some of the conv VAE's convolutions far below the
# matmul rate (one output channel; the weight gradient of the decoder's transposed convolution). There, every
# input pixel is multiplied by all nine taps of the 3x3 kernel in one (pixels, C) @ (C, 9 F) matmul, and the output
# is a sum of shifted slices of those maps; the backward pass is the same two matmuls transposed, with the output
# gradient shifted into "tap map" form. The backward passes are written out (custom VJPs) and their matmuls fold any
# vmapped axes into the pixel axis (custom vmap rules): differentiating the slicing would leave XLA nine unfused
# pads of the maps, and a vmapped weight gradient would be a batch of small matmuls, one per example.


def _taps_matrix(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, F) kernel -> (C, 9 F), columns ordered (r, s, f)."""
    return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(kernel.shape[2], -1)


def _tap_maps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(n, H, W, C) and a (3, 3, C, F) kernel -> (n, H, W, 3, 3, F): every pixel times every tap of the kernel."""
    n, height, width, channels = x.shape
    return (x.reshape(-1, channels) @ _taps_matrix(kernel)).reshape(n, height, width, 3, 3, kernel.shape[-1])


def _taps_pullback(x: jax.Array, kernel: jax.Array, dmaps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients of :func:`_tap_maps` with respect to ``x`` and ``kernel``, given the maps' (n, H, W, 9, F)."""
    channels, features = x.shape[-1], kernel.shape[-1]
    dmaps = dmaps.reshape(-1, 9 * features)
    dx = (dmaps @ _taps_matrix(kernel).T).reshape(x.shape)
    dkernel = (x.reshape(-1, channels).T @ dmaps).reshape(channels, 3, 3, features)
    return dx, jnp.transpose(dkernel, (1, 2, 0, 3))


#: Bytes of intermediates (tap maps, patches) that the tap-map and patch forms build at a time: they run over
#: blocks of examples of about this size (``lax.map`` / ``lax.scan``), which stay in a CPU's L2/L3 caches. 1-16 MiB
#: measured on the conv VAE's layers (``python -m benchmarks.profile_conv``), 4 MiB the fastest.
BLOCK_BYTES = 4 << 20


def _block_size(n: int, per_example_bytes: int) -> int:
    """Examples per block: the largest divisor of ``n`` within BLOCK_BYTES of intermediates (no padded copy of the
    inputs), unless it is under half of what fits; then the block that fits, the inputs zero-padded at the end."""
    fits = max(1, min(n, BLOCK_BYTES // max(1, per_example_bytes)))
    divisor = max(d for d in range(1, fits + 1) if n % d == 0)
    return divisor if 2 * divisor >= fits else fits


def _blocks(a: jax.Array, size: int) -> jax.Array:
    """(n, ...) -> (blocks, size, ...), zero-padded at the end where ``size`` does not divide n."""
    count = -(-a.shape[0] // size)
    if count * size != a.shape[0]:
        a = jnp.pad(a, ((0, count * size - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))
    return a.reshape((count, size) + a.shape[1:])


def _blockwise(fn: Callable, arrays: Sequence[jax.Array], per_example_bytes: int, total: jax.Array | None = None):
    """``fn(*blocks)`` over blocks of examples of ``arrays`` (which share the leading example axis), returning the
    per-example outputs for all n examples. With ``total`` (zeros), ``fn`` returns (per-example outputs or None,
    a term) and the terms are summed into ``total``: a kernel gradient, to which zero-padded examples add nothing."""
    n = arrays[0].shape[0]
    size = _block_size(n, per_example_bytes)
    if size >= n:  # one block: no loop, and no stacked copy of the outputs
        if total is None:
            return fn(*arrays)
        y, term = fn(*arrays)
        return y, total + term
    blocks = tuple(_blocks(a, size) for a in arrays)
    if total is None:
        y = jax.lax.map(lambda b: fn(*b), blocks)
        return y.reshape((-1,) + y.shape[2:])[:n]

    def step(acc: jax.Array, b: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        y, term = fn(*b)
        return acc + term, y

    total, y = jax.lax.scan(step, total, blocks)
    return (None if y is None else y.reshape((-1,) + y.shape[2:])[:n]), total


def _fold_vmapped_axes(summed: Sequence[bool]) -> Callable[[Callable], Callable]:
    """Decorator for ``fn(x, kernel, *rest) -> tuple of outputs``, where ``x`` and ``rest`` lead with the example
    axis: a vmap rule that folds a vmapped axis into the example axis, so that the work is one large computation
    over all examples rather than a batch of small ones. Output ``i`` leads with the example axis, or is a kernel
    gradient (a sum over examples) where ``summed[i]``: one result, the sum over the vmapped axis too. A vmapped
    kernel falls back to plain vmap. Not differentiable (forward or backward passes of custom VJPs)."""

    def decorate(fn: Callable) -> Callable:
        folded = jax.custom_batching.custom_vmap(fn)

        @folded.def_vmap
        def rule(axis_size: int, in_batched: Sequence[bool], x: jax.Array, kernel: jax.Array, *rest: jax.Array):
            if in_batched[1]:
                axes = tuple(0 if batched else None for batched in in_batched)
                return jax.vmap(fn, in_axes=axes)(x, kernel, *rest), tuple(True for _ in summed)
            examples = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                        for a, batched in zip((x,) + rest, in_batched[:1] + in_batched[2:])]
            outs = folded(*[a.reshape((-1,) + a.shape[2:]) for a in examples[:1]], kernel,
                          *[a.reshape((-1,) + a.shape[2:]) for a in examples[1:]])
            return (tuple(o if s else o.reshape((axis_size, -1) + o.shape[1:]) for o, s in zip(outs, summed)),
                    tuple(not s for s in summed))

        return folded

    return decorate


_pullback_folded = _fold_vmapped_axes(summed=(False, True))


def _custom_vjp_keeping_output(forward: Callable, pullback: Callable, *, skips_input_gradient: bool = False
                               ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``f(x, weights)`` with the custom VJP ``pullback(x, weights, y, g) -> (dx, dweights)``, which gets the output
    ``y`` as a residual (an activation's derivative from its output); folded over vmapped axes, as is the forward
    pass. With ``skips_input_gradient``, ``pullback`` also takes ``input_gradient=False``, and gets it where ``x``
    takes no part in the differentiation (a first layer's input data): it then returns (None, dweights), with no
    work, and no room in its blocks, for an input gradient nobody reads."""
    folded_forward = _fold_vmapped_axes(summed=(False,))(lambda x, weights: (forward(x, weights),))
    # (lambdas of the four arrays alone: custom_vmap would trace a keyword's default as an array)
    folded_pullback = _fold_vmapped_axes(summed=(False, True))(lambda x, weights, y, g: pullback(x, weights, y, g))
    folded_weights_only = _fold_vmapped_axes(summed=(True,))(
        lambda x, weights, y, g: (pullback(x, weights, y, g, input_gradient=False)[1],)
    ) if skips_input_gradient else None

    @jax.custom_vjp
    def f(x: jax.Array, weights: jax.Array) -> jax.Array:
        return folded_forward(x, weights)[0]

    def f_fwd(x, weights):  # jax.custom_derivatives.CustomVJPPrimal: the value and whether it is differentiated
        y = folded_forward(x.value, weights.value)[0]
        residuals = (x.value, weights.value, y)
        # The structure of the residuals (static) tells the backward pass whether x needs its gradient.
        return y, (residuals if x.perturbed or not skips_input_gradient else {"weights_only": residuals})

    def f_bwd(residuals, g):
        if isinstance(g, jax.custom_derivatives.SymbolicZero):  # the output takes no part: zero cotangents
            return None, None
        if isinstance(residuals, dict):
            return None, folded_weights_only(*residuals["weights_only"], g)[0]
        return folded_pullback(*residuals, g)

    f.defvjp(f_fwd, f_bwd, symbolic_zeros=True)
    return f


def _conv3x3_by_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    maps = jnp.pad(_tap_maps(x, kernel), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    return functools.reduce(jnp.add, [maps[:, r:r + height, s:s + width, r, s] for r in range(3) for s in range(3)])


@_pullback_folded
def _conv3x3_pullback(x: jax.Array, kernel: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # y[i, j] gathers map (r, s) of pixel (i + r - 1, j + s - 1), so map (r, s) of pixel (i, j) receives
    # g[i - r + 1, j - s + 1] (zero outside the image).
    height, width = x.shape[1:3]
    padded = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dmaps = jnp.stack([padded[:, 2 - r:2 - r + height, 2 - s:2 - s + width] for r in range(3) for s in range(3)],
                      axis=3)
    return _taps_pullback(x, kernel, dmaps)


@jax.custom_vjp
def conv3x3_by_taps(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The 3x3, stride-1, "SAME" convolution of ``nn.Conv`` (cross-correlation, NHWC, HWIO kernel, no bias) as one
    matmul onto the nine taps' maps and nine shifted adds: y[i, j] = sum_{r,s} x[i + r - 1, j + s - 1] k[r, s].

    For layers with few output channels, where a convolution kernel has little to vectorise over: XLA's CPU
    convolution with one output channel (the conv VAE's last layer, 32 -> 1 at 28x28) runs several times slower,
    forward and backward (``python -m benchmarks.profile_conv``). The maps cost 9 floats per output channel and
    pixel, so this pays only while the output channels are few."""
    return _conv3x3_by_taps(x, kernel)


conv3x3_by_taps.defvjp(lambda x, kernel: (_conv3x3_by_taps(x, kernel), (x, kernel)),
                       lambda res, g: _conv3x3_pullback(*res, g))


class TapConv(nn.Module):
    """``nn.Conv(features, (3, 3), padding="SAME")`` (same parameters, names and initialisation) computed by
    :func:`conv3x3_by_taps`; for layers with a few output channels."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv3x3_by_taps(x, kernel) + bias


# For output phase a (row parity) and kernel offset r over the input padded by one zero row on top, the tap of the
# 3x3 kernel that a stride-2 "SAME" transposed convolution applies; 3 stands for a zero tap.
_PHASE_TAPS = np.array([[0, 2], [3, 1]])


def _transpose2x_by_phases(h: jax.Array, kernel: jax.Array) -> jax.Array:
    """The transposed convolution as XLA convolutions: output pixel (2i + a, 2j + b) only sees input pixels
    i-1..i and j-1..j through fixed taps of the kernel, so the four output phases are one 2x2 convolution with 4x
    the output channels (a kernel gathered from the 3x3 one) followed by depth-to-space. This skips the products
    with the zeros that the dilated form of ``nn.ConvTranspose`` inserts (on XLA's CPU backend its gradient runs
    several times faster than ``nn.ConvTranspose``'s), but not the 7 zero taps of the 16 in its 2x2 kernel."""
    n, height, width, channels = h.shape
    features = kernel.shape[-1]
    padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
    rows = _PHASE_TAPS.T[:, None, :, None]
    cols = _PHASE_TAPS.T[None, :, None, :]
    phase_kernel = padded[rows, cols]  # (r, s, a, b, C, F)
    phase_kernel = jnp.transpose(phase_kernel, (0, 1, 4, 2, 3, 5)).reshape(2, 2, channels, 4 * features)
    y = jax.lax.conv_general_dilated(
        jnp.pad(h, ((0, 0), (1, 0), (1, 0), (0, 0))), phase_kernel, (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = y.reshape(n, height, width, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, 2 * height, 2 * width, features)


def _transpose_tap(r: int) -> tuple[int, int]:
    """For tap ``r`` (row or column) of the 3x3 kernel of a stride-2 "SAME" transposed convolution: the output phase
    it writes (output 2i + phase) and how far back it reads the input (pixel i - back). Taps 0 and 2 write the
    even outputs from pixels i - 1 and i, tap 1 the odd outputs from pixel i."""
    return int(r == 1), int(r == 0)


def _transpose2x_by_taps(h: jax.Array, kernel: jax.Array) -> jax.Array:
    n, height, width, _ = h.shape
    maps = _tap_maps(jnp.pad(h, ((0, 0), (1, 0), (1, 0), (0, 0))), kernel)  # padded index i + 1 holds pixel i

    def tap(r: int, s: int) -> jax.Array:
        i, j = 1 - _transpose_tap(r)[1], 1 - _transpose_tap(s)[1]
        return maps[:, i:i + height, j:j + width, r, s]

    phase = {(a, b): functools.reduce(jnp.add, [tap(r, s) for r in range(3) for s in range(3)
                                                if (_transpose_tap(r)[0], _transpose_tap(s)[0]) == (a, b)])
             for a in range(2) for b in range(2)}
    y = jnp.stack([jnp.stack([phase[a, 0], phase[a, 1]], axis=3) for a in range(2)], axis=2)  # (n, H, 2, W, 2, F)
    return y.reshape(n, 2 * height, 2 * width, -1)


def _transpose2x_maps_bytes(h: jax.Array, kernel: jax.Array) -> int:
    return (h.shape[1] + 1) * (h.shape[2] + 1) * 9 * kernel.shape[-1] * h.dtype.itemsize


def _transpose2x_received(h: jax.Array, g: jax.Array) -> jax.Array:
    """The output gradient in tap-map form, (n, H, W, 9, F): map (r, s) of pixel (i, j) went to its phase's output
    (i + back_r, j + back_s) and receives that gradient (zero past the last row or column)."""
    n, height, width, _ = h.shape
    phases = g.reshape(n, height, 2, width, 2, g.shape[-1])

    def received(r: int, s: int) -> jax.Array:
        (a, di), (b, dj) = _transpose_tap(r), _transpose_tap(s)
        return jnp.pad(phases[:, di:, a, dj:, b], ((0, 0), (0, di), (0, dj), (0, 0)))

    return jnp.stack([received(r, s) for r in range(3) for s in range(3)], axis=3)


def _transpose2x_unpack(h: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The (3, 3, C, F) kernel and the (F,) bias, packed flat in ``weights`` (so that the custom VJP and its vmap
    rules see one weight array)."""
    channels = h.shape[-1]
    features = weights.size // (9 * channels + 1)
    return weights[:-features].reshape(3, 3, channels, features), weights[-features:]


def _transpose2x_forward(h: jax.Array, weights: jax.Array, activation: str | None) -> jax.Array:
    kernel, bias = _transpose2x_unpack(h, weights)
    act = ACTIVATIONS[activation] if activation else (lambda v: v)
    return _blockwise(lambda hb: act(_transpose2x_by_taps(hb, kernel) + bias), (h,), _transpose2x_maps_bytes(h, kernel))


def _transpose2x_pullback(h: jax.Array, weights: jax.Array, y: jax.Array, g: jax.Array,
                          activation: str | None) -> tuple[jax.Array, jax.Array]:
    kernel, _ = _transpose2x_unpack(h, weights)

    def block(hb: jax.Array, yb: jax.Array, gb: jax.Array) -> tuple[jax.Array, jax.Array]:
        gz = gb * OUTPUT_DERIVATIVES[activation](yb) if activation else gb  # the gradient before the activation
        dh, dkernel = _taps_pullback(hb, kernel, _transpose2x_received(hb, gz))
        return dh, jnp.concatenate([dkernel.reshape(-1), jnp.sum(gz, axis=(0, 1, 2))])

    return _blockwise(block, (h, y, g), _transpose2x_maps_bytes(h, kernel), total=jnp.zeros_like(weights))


@functools.cache
def _transpose2x_vjp(activation: str | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return _custom_vjp_keeping_output(
        lambda h, weights: _transpose2x_forward(h, weights, activation),
        lambda h, weights, y, g: _transpose2x_pullback(h, weights, y, g, activation))


def transpose2x(h: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                activation: str | None = None) -> jax.Array:
    """``activation(y + bias)`` for the 3x3, stride-2, "SAME" transposed convolution ``y`` of ``nn.ConvTranspose``
    (NHWC input, HWIO kernel; no bias and no activation by default), in tap-map form: one (pixels, C) @ (C, 9 F)
    matmul and, for each of the four output phases, the sum of the shifted maps of its taps (9 products per input
    pixel, none with a zero); the backward pass is the same two matmuls transposed. Both run over blocks of
    examples of about BLOCK_BYTES of maps, with vmapped axes folded into the example axis, and apply the bias and
    the activation (one of :data:`OUTPUT_DERIVATIVES`) in the same blocks. On XLA's CPU backend (2 cores) the conv
    VAE decoder, vmapped over 100 examples x 10 samples as the IWAE loss runs it, is several times faster forward +
    backward this way than with XLA's convolutions and their autodiff (``python -m benchmarks.profile_conv``).
    Reverse-mode derivatives only (a custom VJP)."""
    if h.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != h.shape[-1]:
        raise ValueError(f"transpose2x expects (n, H, W, C) inputs and a (3, 3, C, F) kernel, got {h.shape} and "
                         f"{kernel.shape}")
    features = kernel.shape[-1]
    bias = jnp.zeros((features,), kernel.dtype) if bias is None else bias
    if bias.shape != (features,):
        raise ValueError(f"transpose2x expects a bias of shape {(features,)}, got {bias.shape}")
    _check_fused_activation("transpose2x", activation)
    return _transpose2x_vjp(activation)(h, jnp.concatenate([kernel.reshape(-1), bias]))


class ConvTranspose2x(nn.Module):
    """``nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding="SAME")`` (the same parameters and outputs),
    followed by ``activation`` if one is given (one of :data:`OUTPUT_DERIVATIVES`): computed by :func:`transpose2x`
    or, with ``taps=False``, as XLA's 2x2 convolution onto the four output phases (:func:`_transpose2x_by_phases`,
    differentiated by XLA). tests/test_models.py checks both against flax's layer."""

    features: int
    taps: bool = True
    activation: str | None = None

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, h.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if self.taps:
            return transpose2x(h, kernel, bias, self.activation)
        _check_fused_activation("ConvTranspose2x", self.activation)
        act = ACTIVATIONS[self.activation] if self.activation else (lambda v: v)
        return act(_transpose2x_by_phases(h, kernel) + bias)


# Convolutions as matmuls onto patches ("im2col"), block by block. For the encoder's convolutions (32 and 64
# channels), XLA's CPU convolutions run at under a third of the matmul rate, forward and backward. Here the nine
# shifted copies of the input that a 3x3 kernel reads are laid side by side, (pixels, 9 C), and multiplied by the
# (9 C, F) kernel; the weight gradient is the transposed product with the output gradient, and the input gradient of
# a stride-1 convolution is the same convolution of the output gradient with the flipped kernel. The patches take 9x
# the input's memory, so they are built for a block of examples at a time (``lax.map`` / ``lax.scan`` over blocks
# of about BLOCK_BYTES), where they stay in cache; vmapped axes are folded into the example axis first.

def _same_padding(size: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of a 3x3 "SAME" convolution (XLA's rule: the extra pad goes high)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + 3 - size, 0)
    return out, (total // 2, total - total // 2)


def _taps(padded: jax.Array, stride: int, out_shape: tuple[int, int]) -> list[jax.Array]:
    """The nine (n, oh, ow, C) slices of the padded input that the kernel's taps (r, s) read, in (r, s) order."""
    oh, ow = out_shape
    return [padded[:, r:r + stride * (oh - 1) + 1:stride, s:s + stride * (ow - 1) + 1:stride]
            for r in range(3) for s in range(3)]


def _patches(padded: jax.Array, stride: int, out_shape: tuple[int, int]) -> jax.Array:
    """(n, H', W', C) padded input -> (n * oh * ow, 9 C) patches, columns ordered (r, s, c) like a reshaped kernel."""
    return jnp.concatenate(_taps(padded, stride, out_shape), axis=-1).reshape(-1, 9 * padded.shape[-1])


def _conv_by_multiply_add(padded: jax.Array, kernel: jax.Array, stride: int, out_shape: tuple[int, int]
                          ) -> jax.Array:
    """The convolution of the patches' form as 9 C broadcast multiply-adds, for inputs with at most
    :data:`FEW_INPUTS` channels (the encoder's first layer on images): one fused elementwise kernel, where the
    (pixels, 9 C) @ (9 C, F) matmul has too few inputs per row to run near the matmul rate (the conv VAE's 1 -> 32
    layer, batch 100: forward 0.4 ms against 2.4-3.0 ms on 2 cores)."""
    channels = padded.shape[-1]
    products = [tap[..., c, None] * kernel[t * channels + c]
                for t, tap in enumerate(_taps(padded, stride, out_shape)) for c in range(channels)]
    return functools.reduce(jnp.add, products)


def _pad_same(x: jax.Array, stride: int) -> jax.Array:
    rows, cols = _same_padding(x.shape[1], stride)[1], _same_padding(x.shape[2], stride)[1]
    return jnp.pad(x, ((0, 0), rows, cols, (0, 0)))


def _out_shape(x: jax.Array, stride: int) -> tuple[int, int]:
    return _same_padding(x.shape[1], stride)[0], _same_padding(x.shape[2], stride)[0]


def _patches_bytes(x: jax.Array, stride: int) -> int:
    oh, ow = _out_shape(x, stride)
    return oh * ow * 9 * x.shape[-1] * x.dtype.itemsize


# "Row patches" for stride-1 layers with F < 3 C output channels (the encoder's 64 -> 64; their default is the 1-D
# Winograd form of the same products, further below): only the three column taps are laid side by side, (pixels, 3
# C), and one matmul by the (3 C, 3 F) kernel (rows (s, c), columns (r, f)) gives, for every input row, what it
# contributes through each kernel row r; output row i sums input row i + r - 1's contribution r over the three r
# (rows outside the image contribute nothing, so no padding rows are multiplied). That moves 3 C + 3 F floats a pixel
# where the patches move 9 C + F, for the same FLOPs. The backward pass transposes the same matmul: the output
# gradient shifted by r rows against the row patches (weight gradient) and against the kernel (the row patches'
# gradient, whose three column taps are then summed back onto the input).

#: The forms of :func:`conv3x3_by_patches`: "auto" takes the 1-D Winograd form where row patches would move less
#: memory than nine-tap patches (stride 1 and F < 3 C), nine-tap patches elsewhere.
PATCH_FORMS = ("auto", "patches", "rows", "winograd")


def _rows_matrix(weights: jax.Array, channels: int) -> jax.Array:
    """The (9 C, F) kernel (rows ordered (r, s, c)) -> (3 C, 3 F), rows (s, c), columns (r, f)."""
    features = weights.shape[-1]
    return jnp.transpose(weights.reshape(3, 3, channels, features), (1, 2, 0, 3)).reshape(3 * channels, -1)


def _row_patches(x: jax.Array) -> jax.Array:
    """(n, H, W, C) -> (n * H * W, 3 C): the three column taps of every pixel, the input padded by one column on
    each side (padding rows above and below would only give rows of zeros, so there are none)."""
    width = x.shape[2]
    padded = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, :, s:s + width] for s in range(3)], axis=-1).reshape(-1, 3 * x.shape[-1])


def _row_patches_bytes(x: jax.Array, features: int) -> int:
    """Bytes per example of the row patches and of ``features`` more maps of their H x W x 3 layout (their
    products with the kernel, the shifted output gradient)."""
    return x.shape[1] * x.shape[2] * 3 * (x.shape[-1] + features) * x.dtype.itemsize


def _sum_kernel_rows(contributions: jax.Array) -> jax.Array:
    """(n, H, W, 3, F) contributions of every input row through each kernel row r -> the (n, H, W, F) output:
    output row i reads input row i + r - 1 through kernel row r; rows outside the image contribute zeros."""
    height = contributions.shape[1]
    above = jnp.pad(contributions[:, :height - 1, :, 0], ((0, 0), (1, 0), (0, 0), (0, 0)))
    below = jnp.pad(contributions[:, 1:, :, 2], ((0, 0), (0, 1), (0, 0), (0, 0)))
    return above + contributions[:, :, :, 1] + below


def _kernel_rows_gradient(g: jax.Array) -> jax.Array:
    """The adjoint of :func:`_sum_kernel_rows`: the (n, H, W, F) output gradient -> the (n, H, W, 3, F) gradient of
    the contributions. Input row j contributed through kernel row r to output row j - r + 1."""
    height = g.shape[1]
    shifted = jnp.pad(g, ((0, 0), (1, 1), (0, 0), (0, 0)))
    return jnp.stack([shifted[:, 2 - r:2 - r + height] for r in range(3)], axis=3)


def _conv_by_rows(x: jax.Array, rows_kernel: jax.Array) -> jax.Array:
    n, height, width, _ = x.shape
    return _sum_kernel_rows((_row_patches(x) @ rows_kernel).reshape(n, height, width, 3, -1))


def _rows_pullback(xb: jax.Array, gz: jax.Array, rows_kernel: jax.Array, input_gradient: bool = True
                   ) -> tuple[jax.Array | None, jax.Array]:
    """The input gradient (None without ``input_gradient``) and the (9 C, F) kernel gradient of
    :func:`_conv_by_rows`, given the output gradient."""
    n, height, width, channels = xb.shape
    features = gz.shape[-1]
    dcontributions = _kernel_rows_gradient(gz).reshape(-1, 3 * features)
    dkernel = (_row_patches(xb).T @ dcontributions).reshape(3, channels, 3, features)
    dkernel = jnp.transpose(dkernel, (2, 0, 1, 3)).reshape(-1, features)
    if not input_gradient:
        return None, dkernel
    # Column tap s of pixel (i, j) read input pixel (i, j + s - 1).
    dpatches = (dcontributions @ rows_kernel.T).reshape(n, height, width, 3, channels)
    dpatches = jnp.pad(dpatches, ((0, 0), (0, 0), (1, 1), (0, 0), (0, 0)))
    return functools.reduce(jnp.add, [dpatches[:, :, 2 - s:2 - s + width, s] for s in range(3)]), dkernel


# The 1-D Winograd form F(2, 3) (Lavin and Gray, 2016) of the row-patch convolution, for the same layers. Along the
# width, each pair of output columns of a row's three-tap product, y[2t] = d[2t] k0 + d[2t+1] k1 + d[2t+2] k2 and
# y[2t+1] = d[2t+1] k0 + d[2t+2] k1 + d[2t+3] k2 (d the row padded by one column each side, k_s the (C, 3 F) kernel
# columns of tap s for the three kernel rows r), needs 4 matmuls instead of 6:
#   m0 = (d0 - d2) k0,  m1 = (d1 + d2)(k0 + k1 + k2)/2,  m2 = (d2 - d1)(k0 - k1 + k2)/2,  m3 = (d1 - d3) k2,
#   y[2t] = m0 + m1 + m2,  y[2t+1] = m1 - m2 - m3.
# Two thirds of the row form's FLOPs in all three matmuls (forward, weight and input gradients), on inputs of 2 C
# floats a pixel (4 transformed inputs per pair of columns) against the row patches' 3 C. The coefficients (0, 1,
# 1/2) are exact in binary: the results differ from the direct form by float rounding order only. The rows then
# sum as in the row form. Odd widths get a zero column on the right.

def _winograd_matrix(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, F) kernel -> (4, C, 3 F): the transformed kernel G k along the column taps s (G's rows (1, 0, 0),
    (1, 1, 1)/2, (1, -1, 1)/2, (0, 0, 1)), columns (r, f)."""
    k0, k1, k2 = kernel[:, 0], kernel[:, 1], kernel[:, 2]  # (r, C, F) each
    u = jnp.stack([k0, (k0 + k1 + k2) / 2, (k0 - k1 + k2) / 2, k2])  # (4, r, C, F)
    return jnp.transpose(u, (0, 2, 1, 3)).reshape(4, kernel.shape[2], -1)


def _winograd_kernel_gradient(du: jax.Array, channels: int) -> jax.Array:
    """The adjoint of :func:`_winograd_matrix`: (4, C, 3 F) -> the (9 C, F) kernel gradient, rows (r, s, c)."""
    du = jnp.transpose(du.reshape(4, channels, 3, -1), (0, 2, 1, 3))  # (4, r, C, F)
    half = (du[1] + du[2]) / 2
    dk = jnp.stack([du[0] + half, (du[1] - du[2]) / 2, half + du[3]], axis=1)  # (r, s, C, F)
    return dk.reshape(-1, dk.shape[-1])


def _winograd_inputs(x: jax.Array) -> jax.Array:
    """(n, H, W, C) -> (4, n H ceil(W / 2), C): the transformed inputs B^T d of every pair of output columns."""
    width, pairs = x.shape[2], -(-x.shape[2] // 2)
    padded = jnp.pad(x, ((0, 0), (0, 0), (1, 2 * pairs + 1 - width), (0, 0)))
    d0, d1, d2, d3 = (padded[:, :, s:s + 2 * pairs - 1:2] for s in range(4))
    return jnp.stack([d0 - d2, d1 + d2, d2 - d1, d1 - d3]).reshape(4, -1, x.shape[-1])


def _winograd_bytes(x: jax.Array, features: int) -> int:
    """Bytes per example of the transformed inputs (4 C floats a pair of columns) and their products (4 x 3 F)."""
    return x.shape[1] * -(-x.shape[2] // 2) * 4 * (x.shape[-1] + 3 * features) * x.dtype.itemsize


def _conv_by_winograd(x: jax.Array, matrix: jax.Array) -> jax.Array:
    n, height, width, _ = x.shape
    pairs = -(-width // 2)
    m = jnp.einsum("xpc,xcg->xpg", _winograd_inputs(x), matrix).reshape(4, n, height, pairs, 3, -1)
    even, odd = m[0] + m[1] + m[2], m[1] - m[2] - m[3]  # (n, H, pairs, r, F)
    return _sum_kernel_rows(jnp.stack([even, odd], axis=3).reshape(n, height, 2 * pairs, 3, -1)[:, :, :width])


def _winograd_pullback(xb: jax.Array, gz: jax.Array, matrix: jax.Array, input_gradient: bool = True
                       ) -> tuple[jax.Array | None, jax.Array]:
    """The input gradient (None without ``input_gradient``) and the (9 C, F) kernel gradient of
    :func:`_conv_by_winograd`, given the output gradient: the same three matmuls transposed."""
    n, height, width, channels = xb.shape
    features, pairs = gz.shape[-1], -(-width // 2)
    # The contributions' gradient (a zero column for an odd width's padding), then the adjoint of the output
    # transform: dm = (de, de + do, de - do, -do) from the even and odd columns' gradients.
    dcontributions = jnp.pad(_kernel_rows_gradient(gz), ((0, 0), (0, 0), (0, 2 * pairs - width), (0, 0), (0, 0)))
    de = dcontributions[:, :, 0::2].reshape(-1, 3 * features)
    do = dcontributions[:, :, 1::2].reshape(-1, 3 * features)
    dm = jnp.stack([de, de + do, de - do, -do])
    dkernel = _winograd_kernel_gradient(jnp.einsum("xpc,xpg->xcg", _winograd_inputs(xb), dm), channels)
    if not input_gradient:
        return None, dkernel
    dv = jnp.einsum("xpg,xcg->xpc", dm, matrix).reshape(4, n, height, pairs, channels)
    # The adjoint of the input transform: column 2t + s of the padded row received dd_s of pair t.
    dd0, dd1, dd2, dd3 = dv[0], dv[1] - dv[2] + dv[3], dv[1] + dv[2] - dv[0], -dv[3]
    right, left = ((0, 0), (0, 0), (0, 1), (0, 0)), ((0, 0), (0, 0), (1, 0), (0, 0))
    even = jnp.pad(dd0, right) + jnp.pad(dd2, left)  # padded columns 0, 2, ..., 2 pairs
    odd = jnp.pad(dd1, right) + jnp.pad(dd3, left)  # padded columns 1, 3, ..., 2 pairs + 1
    dpadded = jnp.stack([even, odd], axis=3).reshape(n, height, 2 * pairs + 2, channels)
    return dpadded[:, :, 1:width + 1], dkernel


def _conv_by_patches(x: jax.Array, weights: jax.Array, stride: int, activation: str | None, form: str) -> jax.Array:
    """``weights``: the (9 C, F) kernel with the bias as an extra last row; ``form`` "patches", "rows" or
    "winograd". Blocks of examples are padded inside the loop, where they are small."""
    out_shape, kernel, bias = _out_shape(x, stride), weights[:-1], weights[-1]
    act = ACTIVATIONS[activation] if activation else (lambda v: v)
    if form == "winograd":
        matrix = _winograd_matrix(kernel.reshape(3, 3, x.shape[-1], -1))
        return _blockwise(lambda b: act(_conv_by_winograd(b, matrix) + bias), (x,),
                          _winograd_bytes(x, kernel.shape[-1]))
    if form == "rows":
        rows_kernel = _rows_matrix(kernel, x.shape[-1])
        return _blockwise(lambda b: act(_conv_by_rows(b, rows_kernel) + bias), (x,),
                          _row_patches_bytes(x, kernel.shape[-1]))
    if x.shape[-1] <= FEW_INPUTS:  # no blocks: the multiply-adds build nothing but the output
        return act(_conv_by_multiply_add(_pad_same(x, stride), kernel, stride, out_shape) + bias)
    outputs_bytes = out_shape[0] * out_shape[1] * kernel.shape[-1] * x.dtype.itemsize
    return _blockwise(lambda b: act(_patches(_pad_same(b, stride), stride, out_shape) @ kernel + bias).reshape(
        (b.shape[0],) + out_shape + (-1,)), (x,), _patches_bytes(x, stride) + outputs_bytes)


def _patches_pullback(x: jax.Array, weights: jax.Array, y: jax.Array, g: jax.Array, stride: int,
                      activation: str | None, form: str, input_gradient: bool = True
                      ) -> tuple[jax.Array | None, jax.Array]:
    """Gradients with respect to ``x`` (None without ``input_gradient``) and the (9 C + 1, F) ``weights``, given the
    output ``y`` and its gradient."""
    channels, features = x.shape[-1], weights.shape[-1]
    if form in ("rows", "winograd"):
        if form == "rows":
            matrix, pullback = _rows_matrix(weights[:-1], channels), _rows_pullback
            # the row patches, the shifted output gradient (3 F a pixel) and the row patches' gradient (3 C)
            per_example = _row_patches_bytes(x, features + (channels if input_gradient else 0))
        else:
            matrix, pullback = _winograd_matrix(weights[:-1].reshape(3, 3, channels, features)), _winograd_pullback
            per_example = _winograd_bytes(x, features)  # the transformed inputs (or their gradient) and dm

        def rows_block(xb: jax.Array, yb: jax.Array, gb: jax.Array) -> tuple[jax.Array | None, jax.Array]:
            gz = gb * OUTPUT_DERIVATIVES[activation](yb) if activation else gb  # the gradient before the activation
            dx, dkernel = pullback(xb, gz, matrix, input_gradient)
            return dx, jnp.concatenate([dkernel, jnp.sum(gz, axis=(0, 1, 2))[None]])

        return _blockwise(rows_block, (x, y, g), per_example, total=jnp.zeros_like(weights))
    out_shape, kernel = _out_shape(x, stride), weights[:-1].reshape(3, 3, channels, features)
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3).reshape(-1, channels)

    def block(xb: jax.Array, yb: jax.Array, gb: jax.Array) -> tuple[jax.Array | None, jax.Array]:
        gz = gb.reshape(-1, features)  # the gradient before the activation
        if activation:
            gz = gz * OUTPUT_DERIVATIVES[activation](yb.reshape(-1, features))
        dweights = jnp.concatenate([_patches(_pad_same(xb, stride), stride, out_shape).T @ gz,
                                    jnp.sum(gz, axis=0, keepdims=True)])
        if not input_gradient:
            return None, dweights
        if stride == 2:
            return _stride2_input_gradient(gz.reshape(gb.shape), kernel, xb.shape), dweights
        if stride != 1:
            return gz.reshape(gb.shape), dweights
        # The input gradient of a stride-1 convolution: gz convolved with the flipped kernel, inputs <-> outputs.
        return (_patches(_pad_same(gz.reshape(gb.shape), 1), 1, out_shape) @ flipped).reshape(xb.shape), dweights

    per_example = _patches_bytes(x, stride)
    if input_gradient and stride == 1:  # the patches of the output gradient
        per_example += _patches_bytes(g, 1)
    if input_gradient and stride == 2:  # the tap maps of the output gradient
        per_example += _transpose2x_maps_bytes(g, jnp.swapaxes(kernel, 2, 3))
    dx, dweights = _blockwise(block, (x, y, g), per_example, total=jnp.zeros_like(weights))
    if input_gradient and stride > 2:  # a wider stride's input gradient is left to XLA (dx holds gz here)
        _, pullback = jax.vjp(lambda x: _conv_by_xla(x, kernel, stride), x)
        dx, = pullback(dx)
    return dx, dweights


def _stride2_input_gradient(gz: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
    """The input gradient of a 3x3, stride-2 "SAME" convolution, given the gradient ``gz`` of its (n, oh, ow, F)
    output: output pixel (i, j) read padded input pixel (2i + r, 2j + s) through tap (r, s), so that pixel receives
    gz[i, j] @ k[r, s]^T. That is the stride-2 transposed convolution of :func:`_transpose2x_by_taps` (which writes
    tap r to 2i + 2 - r) with the kernel flipped and transposed, cropped to the input by the convolution's top and
    left padding; XLA's strided-convolution gradient (a dilated convolution) ran several times slower."""
    full = _transpose2x_by_taps(gz, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))  # (n, 2 oh, 2 ow, C)
    (_, (top, _)), (_, (left, _)) = _same_padding(x_shape[1], 2), _same_padding(x_shape[2], 2)
    return full[:, top:top + x_shape[1], left:left + x_shape[2]]


def _conv_by_xla(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.cache
def _conv_by_patches_vjp(stride: int, activation: str | None,
                         form: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return _custom_vjp_keeping_output(
        lambda x, weights: _conv_by_patches(x, weights, stride, activation, form),
        lambda x, weights, y, g, input_gradient=True: _patches_pullback(x, weights, y, g, stride, activation, form,
                                                                         input_gradient),
        skips_input_gradient=True)


def conv3x3_by_patches(x: jax.Array, kernel: jax.Array, stride: int = 1, bias: jax.Array | None = None,
                       activation: str | None = None, form: str = "auto") -> jax.Array:
    """``activation(conv + bias)`` for the 3x3 "SAME" convolution of ``nn.Conv`` with ``strides=(stride, stride)``
    (cross-correlation, NHWC input, HWIO kernel; no bias and no activation by default), as blocks of
    (pixels, 9 C) @ (9 C, F) matmuls onto patches, with the bias and the activation (one of
    :data:`OUTPUT_DERIVATIVES`) applied in the same blocks. The weight gradient is the transposed product and, at
    stride 1, the input gradient the same convolution of the output gradient with the flipped kernel, at stride 2
    the tap-map transposed convolution of the output gradient (:func:`_stride2_input_gradient`); at wider strides
    it is XLA's. ``form="rows"`` (stride 1 only) multiplies row patches instead, the three column taps,
    (pixels, 3 C) @ (3 C, 3 F), and sums three shifted row slices of the products; its gradients are the transposed
    matmuls. That moves 3 C + 3 F floats a pixel against the patches' 9 C + F. ``form="winograd"`` (stride 1 only;
    what ``"auto"`` takes at stride 1 with fewer than 3 C output channels) computes the row form's three-tap
    products along the width by 1-D Winograd F(2, 3): four (C, 3 F) matmuls per pair of output columns instead of
    six, two thirds of the FLOPs forward and backward, on transformed inputs of 2 C floats a pixel. Measured on the
    conv VAE's 64 -> 64 layers (batch 100, 2 cores), forward + backward 22.0 ms against 28.4 in row patches and
    35.1 in nine-tap patches (``python -m benchmarks.profile_conv``, 2026-12-06). ``form="patches"`` always takes
    the nine-tap patches. Reverse-mode derivatives only (a custom VJP)."""
    if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"conv3x3_by_patches expects (n, H, W, C) inputs and a (3, 3, C, F) kernel, got "
                         f"{x.shape} and {kernel.shape}")
    _check_fused_activation("conv3x3_by_patches", activation)
    features = kernel.shape[-1]
    bias = jnp.zeros((features,), kernel.dtype) if bias is None else bias
    if bias.shape != (features,):
        raise ValueError(f"conv3x3_by_patches expects a bias of shape {(features,)}, got {bias.shape}")
    if form not in PATCH_FORMS:
        raise ValueError(f"conv3x3_by_patches form must be one of {PATCH_FORMS}, got {form!r}")
    if form in ("rows", "winograd") and stride != 1:
        raise ValueError(f"conv3x3_by_patches form={form!r} needs stride 1, got stride {stride}")
    if form == "auto":
        form = "winograd" if stride == 1 and features < 3 * x.shape[-1] else "patches"
    weights = jnp.concatenate([kernel.reshape(-1, features), bias[None]])
    return _conv_by_patches_vjp(int(stride), activation, form)(x, weights)


class PatchConv(nn.Module):
    """``nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME")`` (same parameters, names and
    initialisation), followed by ``activation`` if one is given (one of :data:`OUTPUT_DERIVATIVES`), computed by
    :func:`conv3x3_by_patches` in ``form`` ("auto", "patches", "rows" or "winograd")."""

    features: int
    stride: int = 1
    activation: str | None = None
    form: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv3x3_by_patches(x, kernel, self.stride, bias, self.activation, self.form)


class ConvDecoder(nn.Module):
    """Convolutional decoder to 28x28 images: dense 14x14x64, transposed conv 32 (stride 2) to 28x28, then a
    3x3 conv to ``channels_out`` output maps (1 for Bernoulli logits, 2 for a Gaussian's mean and scale).
    Returns flat outputs of size 784 * ``channels_out`` (channel-major), as :mod:`distributions` expects.

    ``convs="taps"`` (default) computes the transposed and the last convolution in tap-map form
    (:func:`transpose2x`, :class:`TapConv`), measured faster on XLA's CPU backend; ``convs="xla"`` leaves both to
    XLA's convolutions and their autodiff, e.g. to compare on a GPU. Same parameters and function either way. The
    tap-map forms define reverse-mode derivatives only (custom VJPs whose backward passes carry vmap rules): second
    derivatives need ``convs="xla"``, and forward mode (``jax.jvp``) needs it too, with a latent of more than
    :data:`FEW_INPUTS` dimensions (:func:`few_inputs_dot` is a custom VJP as well)."""

    channels_out: int = 1
    activation: str = "relu"
    convs: str = "taps"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        if self.convs not in ("taps", "xla"):
            raise ValueError(f"ConvDecoder convs must be 'taps' or 'xla', got {self.convs!r}")
        taps = self.convs == "taps"
        act = get_activation(self.activation)
        lead = z.shape[:-1]
        h = act(dense(14 * 14 * 64, z.shape[-1])(z.reshape((-1, z.shape[-1]))))
        h = h.reshape((-1, 14, 14, 64))
        if self.activation in OUTPUT_DERIVATIVES:  # applied inside the tap-map form's blocks, with the bias
            h = ConvTranspose2x(32, taps=taps, activation=self.activation, name="ConvTranspose_0")(h)
        else:
            h = act(ConvTranspose2x(32, taps=taps, name="ConvTranspose_0")(h))
        last = TapConv if taps else functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME")
        h = last(self.channels_out, name="Conv_0")(h)  # (n, 28, 28, C), nn.Conv's parameters either way
        h = jnp.moveaxis(h, -1, 1)  # channel-major so that a Gaussian's [loc, scale] split is contiguous
        return h.reshape(lead + (-1,))
