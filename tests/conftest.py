"""Shared fixtures for the core tests: small models, fixed keys, cached datasets.

Everything here is small on purpose: the suite has to stay fast on 2 CPU cores.
"""

from __future__ import annotations

import os

# XLA's CPU compiler spends most of its time in LLVM's -O2 pipeline; the tests compile many small programs and run
# each for milliseconds, so -O1 roughly halves the suite's time (measured: compiles 2.5x cheaper, run time the
# same for these sizes). Set before JAX creates its backend; an explicit setting in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dlvm_jax import data  # noqa: E402
from dlvm_jax.models import VAE, LinearGaussian, LinearGaussianConfig, VAEConfig  # noqa: E402


def _assert_one_line(err: BaseException) -> None:
    """A user-facing error message is a single, non-empty line."""
    msg = str(err)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg, f"error message spans several lines: {msg!r}"


@pytest.fixture
def assert_one_line():
    """``assert_one_line(excinfo.value)``: the error message is one non-empty line."""
    return _assert_one_line


@pytest.fixture(scope="session")
def lg_model() -> LinearGaussian:
    return LinearGaussian(LinearGaussianConfig(data_dim=5, latent_dim=2))


@pytest.fixture(scope="session")
def lg_params(lg_model):
    """Random generative parameters with the model's default (crude, mis-specified) encoder."""
    return jax.jit(lg_model.init)(jax.random.key(0))  # jitted: one compile instead of many eager ops


@pytest.fixture(scope="session")
def lg_exact_params(lg_model, lg_params):
    """The same generative parameters with q(z|x) set to the exact posterior p(z|x)."""
    return {"generative": lg_params["generative"],
            "encoder": jax.jit(lg_model.exact_encoder)(lg_params["generative"])}


@pytest.fixture(scope="session")
def lg_data(lg_model, lg_params) -> jax.Array:
    """100 points drawn from the model itself."""
    return jax.jit(lg_model.sample_data, static_argnums=2)(lg_params, jax.random.key(1), 100)


@pytest.fixture(scope="session")
def lg_exact_log_px(lg_model, lg_params, lg_data) -> jax.Array:
    return jax.jit(jax.vmap(lg_model.exact_log_prob, in_axes=(None, 0)))(lg_params, lg_data)


@pytest.fixture(scope="session")
def digits() -> data.Dataset:
    return data.digits()


@pytest.fixture(scope="session")
def small_vae() -> VAE:
    """A small MLP VAE for the 8x8 digits (64 values in [0, 1])."""
    return VAE(VAEConfig(data_shape=(64,), latent_dim=4, hidden=(32,), likelihood="bernoulli"))


@pytest.fixture(scope="session")
def small_vae_params(small_vae, digits):
    init = jax.jit(lambda key, mean: small_vae.init(key, data_mean=mean))  # one compile instead of op-by-op
    return init(jax.random.key(0), np.mean(digits.x_train, axis=0))
