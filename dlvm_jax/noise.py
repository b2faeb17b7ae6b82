"""Standard-normal noise and key splits: the same numbers as ``jax.random.normal`` and ``jax.random.split``, computed
without XLA:CPU's loop.

JAX lowers its Threefry-2x32 hash, on the CPU only, as a rolled loop of five iterations (to keep compile times
down), and XLA:CPU runs each iteration as a separate call with its own copies and kernel launches. The functions
here compute the same hash with its twenty rounds written out, and then follow ``jax.random``'s own recipe bit for
bit (``jax_threefry_partitionable`` counters, the 23 mantissa bits of a float in [1, 2), ``sqrt(2) erfinv(u)``),
so that a seed gives the very same noise with either (tests/test_noise.py compares them exactly and checks the hash
against the published known answers).

Measured on 2 cores (``python -m benchmarks.profile_rng``, each call waited for): the MLP VAE step's noise alone,
100 x 50 draws, in 92 us against 203 us; 100 x 10 x 50 in 244 against 441 us. Inside a step the gain is smaller,
because the hash is a chain of cheap integer ops that XLA copies into every kernel that reads the noise (three
kernels of the MLP VAE step compute it) while the loop's result is computed once and can overlap the encoder: the
library's MLP VAE step 1.046x as fast at M=1 and 0.976x at M=10 in one process, 1.03-1.09x at M=1 and 1.02x at M=10
in the benchmark's fresh processes (``python -m benchmarks.ab_commits``). Where many kernels read the noise it
loses: the GMVAE's per-example draws, each read by the five clusters' terms, made its step 0.88x as fast. So the
library uses it for the batch's noise of :func:`dlvm_jax.objectives.make_loss` and the train step's key split, and
keeps ``jax.random`` elsewhere.

Any other key (``rbg``, ``unsafe_rbg``, a custom implementation), dtype, or the non-partitionable Threefry setting
falls back to ``jax.random`` itself.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: Array, d: int) -> Array:
    return lax.shift_left(x, np.uint32(d)) | lax.shift_right_logical(x, np.uint32(32 - d))


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 block cipher (20 rounds, Salmon et al. 2011) of the counter pairs ``(x1, x2)`` under the
    key ``(k1, k2)``; uint32 arrays, broadcast together. The hash of ``jax.random``, unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _threefry_data(key: Array) -> Array | None:
    """The (2,) uint32 data of a single Threefry key, typed or raw, where ``jax.random`` would use the
    partitionable counters; None for any other key (``jax.random`` then does the work)."""
    if not jax.config.jax_threefry_partitionable:
        return None
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    if key.dtype == jnp.uint32 and key.shape == (2,) and str(jax.config.jax_default_prng_impl) == "threefry2x32":
        return key
    return None


def _counters(shape: Sequence[int]) -> tuple[Array, Array]:
    """The counters of ``jax.random``'s partitionable Threefry: the row-major index of each entry as a 64-bit
    number split in (high, low) uint32 halves; the high half is 0 below 2**32 entries."""
    return jnp.zeros(shape, jnp.uint32), lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)


def normal(key: Array, shape: Sequence[int] = (), dtype: Any = None) -> Array:
    """Standard-normal draws of ``shape``: exactly ``jax.random.normal(key, shape, dtype)`` (``dtype`` None: JAX's
    default float, float64 under ``jax_enable_x64``)."""
    shape = tuple(int(d) for d in shape)
    data = _threefry_data(key)
    dtype = jax.dtypes.canonicalize_dtype(float if dtype is None else dtype)
    if data is None or dtype != jnp.float32 or math.prod(shape) >= 2 ** 32:
        return jax.random.normal(key, shape, dtype)
    b1, b2 = threefry2x32(data[0], data[1], *_counters(shape))
    bits = b1 ^ b2
    # uniform on [lo, 1) with lo the float after -1, as jax.random.uniform: 23 random mantissa bits of [1, 2)
    lo, hi = np.float32(np.nextafter(np.float32(-1), np.float32(0))), np.float32(1)
    floats = lax.bitcast_convert_type(lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000),
                                      jnp.float32) - np.float32(1)
    u = jnp.maximum(lo, floats * (hi - lo) + lo)
    return np.float32(np.sqrt(2)) * lax.erf_inv(u)


def split(key: Array, num: int = 2) -> Array:
    """``num`` new keys from ``key``: exactly ``jax.random.split(key, num)`` (the same type of key back)."""
    data = _threefry_data(key)
    if data is None:
        return jax.random.split(key, num)
    b1, b2 = threefry2x32(data[0], data[1], *_counters((num,)))
    new = jnp.stack([b1, b2], axis=-1)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(new, impl="threefry2x32")
    return new
