"""dlvm_jax.noise: jax.random.normal's and jax.random.split's numbers, bit for bit, without XLA:CPU's rolled loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlvm_jax import noise

SHAPES = [(), (1,), (7,), (100, 1, 50), (3, 5, 2)]


def key_bits(keys):
    return np.asarray(jax.random.key_data(keys) if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys)


@pytest.mark.parametrize("typed", [True, False], ids=["typed_key", "raw_key"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_normal_is_jax_random_normal_bit_for_bit(shape, typed):
    for seed in (0, 1, 2**31 + 5):
        key = jax.random.key(seed) if typed else jax.random.PRNGKey(seed)
        want = np.asarray(jax.random.normal(key, shape))
        assert np.array_equal(np.asarray(noise.normal(key, shape)), want)
        assert np.array_equal(np.asarray(jax.jit(lambda k: noise.normal(k, shape))(key)), want)


def test_normal_under_vmap_is_jax_random_normal_of_each_key():
    keys = jax.random.split(jax.random.key(3), 64)
    want = jax.vmap(lambda k: jax.random.normal(k, (4, 2)))(keys)
    assert np.array_equal(np.asarray(jax.vmap(lambda k: noise.normal(k, (4, 2)))(keys)), np.asarray(want))


def test_normal_has_standard_moments():
    z = np.asarray(noise.normal(jax.random.key(0), (200_000,)), np.float64)
    # standard errors of the mean and of the variance: 1/sqrt(n) = 0.0022 and sqrt(2/n) = 0.0032
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1.0) < 0.015
    assert np.all(np.isfinite(z))


@pytest.mark.parametrize("typed", [True, False], ids=["typed_key", "raw_key"])
@pytest.mark.parametrize("num", [1, 2, 5])
def test_split_is_jax_random_split(num, typed):
    key = jax.random.key(11) if typed else jax.random.PRNGKey(11)
    got, want = noise.split(key, num), jax.random.split(key, num)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(key_bits(got), key_bits(want))
    # the split keys draw the same noise as jax.random's
    assert np.array_equal(np.asarray(noise.normal(got[1 % num], (9,))), np.asarray(jax.random.normal(want[1 % num], (9,))))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_other_key_implementations_fall_back_to_jax_random(impl):
    key = jax.random.key(4, impl=impl)
    assert np.array_equal(np.asarray(noise.normal(key, (6, 3))), np.asarray(jax.random.normal(key, (6, 3))))
    assert np.array_equal(key_bits(noise.split(key, 3)), key_bits(jax.random.split(key, 3)))


def test_default_dtype_follows_x64():
    key = jax.random.key(6)
    with jax.enable_x64(True):
        got, want = noise.normal(key, (5,)), jax.random.normal(key, (5,))
        assert got.dtype == want.dtype == jnp.float64 and np.array_equal(np.asarray(got), np.asarray(want))
    assert noise.normal(key, (5,)).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_other_dtypes_fall_back_to_jax_random(dtype):
    key = jax.random.key(5)
    got = noise.normal(key, (8,), dtype)
    assert got.dtype == dtype
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(jax.random.normal(key, (8,), dtype), np.float32))


@pytest.mark.parametrize("key, counter, expected", [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
], ids=["zeros", "ones", "pi"])
def test_threefry_matches_the_published_known_answers(key, counter, expected):
    # Salmon et al. 2011 (Random123's kat_vectors), Threefry-2x32 with 20 rounds
    x1, x2 = noise.threefry2x32(*(jnp.uint32(v) for v in key + counter))
    assert (int(x1), int(x2)) == expected


def test_compiled_normal_has_no_loop():
    compiled = jax.jit(lambda k: noise.normal(k, (100, 1, 50))).lower(jax.random.key(0)).compile().as_text()
    assert " while(" not in compiled
