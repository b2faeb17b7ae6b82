"""likelihood.py: importance-sampled log p(x) against the linear-Gaussian model's exact log p(x)."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from dlvm_jax import likelihood
from dlvm_jax.likelihood import ISEstimate, log_likelihood


@pytest.mark.parametrize("num_samples", [1, 10, 1000])
def test_is_estimate_exact_with_exact_posterior(lg_model, lg_exact_params, lg_data, lg_exact_log_px, num_samples):
    """With q(z|x) = p(z|x) every weight equals p(x): the estimate is exact for any K, the ELBO is tight, the
    standard error is 0 and the effective sample size is K."""
    # batch_size 30 does not divide 100 (padding path) and chunk_size 300 does not divide 1000 (the last chunk
    # is cut): both must leave exactly K weights per example.
    est = log_likelihood(lg_model, lg_exact_params, lg_data, jax.random.key(2), num_samples=num_samples,
                         chunk_size=300, batch_size=30, progress=False)
    assert isinstance(est, ISEstimate)
    for field in est:
        chex.assert_shape(field, (100,))
        assert bool(jnp.all(jnp.isfinite(field)))
    # 1e-4 nats: float32 log-weights of magnitude ~10 built from a 5x5 Cholesky and a 2x2 inverse round at
    # ~1e-6 (observed ~3e-6); any bias of the estimator or mismatch of the posterior would be >> 1e-4.
    np.testing.assert_allclose(est.log_px, lg_exact_log_px, rtol=0, atol=1e-4)
    np.testing.assert_allclose(est.elbo, lg_exact_log_px, rtol=0, atol=1e-4)
    np.testing.assert_array_less(est.stderr, 1e-5)  # weights equal up to float32 rounding
    # ESS = (sum v)^2 / sum v^2 = K for equal weights; relative 1e-4 covers the weights' rounding (~1e-6).
    np.testing.assert_allclose(est.ess, num_samples, rtol=1e-4)


def test_is_estimate_converges_with_misspecified_q(lg_model, lg_params, lg_data, lg_exact_log_px):
    """The default encoder is deliberately crude (q = N(0.5 A* x + c, I)): the ELBO is several nats below
    log p(x), the K = 1000 IS estimate is within 0.05 nats on average, and it improves on K = 10."""
    key = jax.random.key(3)
    est = log_likelihood(lg_model, lg_params, lg_data, key, num_samples=1000, chunk_size=250, progress=False)
    est10 = log_likelihood(lg_model, lg_params, lg_data, key, num_samples=10, progress=False)
    exact = np.asarray(lg_exact_log_px, np.float64)
    err = np.asarray(est.log_px, np.float64) - exact
    # Acceptance: within 0.05 nats per point, averaged over the 100 points (observed ~0.02; the average
    # delta-method standard error is ~0.006, so 0.05 is several standard errors, yet far below the ELBO gap).
    assert abs(err.mean()) < 0.05, err.mean()
    assert np.abs(err).max() < 0.5  # no single point is far off either
    # K = 10 is visibly worse, on average and in the worst point: the estimate converges as K grows.
    err10 = np.asarray(est10.log_px, np.float64) - exact
    assert abs(err10.mean()) > 2 * abs(err.mean()) and np.abs(err10).max() > np.abs(err).max()
    # The ELBO on the same samples is below log p(x) (here by several nats) and, by Jensen's inequality on the
    # same weights, never above the IS estimate (float32 slack 1e-5).
    elbo = np.asarray(est.elbo, np.float64)
    assert elbo.mean() < exact.mean() - 1.0
    assert np.all(elbo < exact)
    assert np.all(elbo <= np.asarray(est.log_px) + 1e-5)
    # The weights are uneven: 1 <= ESS < K, positive standard error.
    assert np.all((np.asarray(est.ess) >= 1.0) & (np.asarray(est.ess) < 1000))
    assert np.all(np.asarray(est.stderr) > 0)
    # Summary: dataset means of the fields.
    summary = est.summary()
    assert summary["num_examples"] == 100
    assert summary["log_px"] == pytest.approx(float(np.mean(est.log_px)), rel=1e-6)
    assert summary["elbo"] == pytest.approx(float(np.mean(est.elbo)), rel=1e-6)
    assert summary["ess_mean"] == pytest.approx(float(np.mean(est.ess)), rel=1e-6)
    assert summary["log_px_mc_se"] == pytest.approx(
        math.sqrt(float(np.sum(np.square(est.stderr)))) / 100, rel=1e-5)


def test_batch_estimator_deterministic_in_key(lg_model, lg_params, lg_data):
    estimate = likelihood.make_batch_estimator(lg_model, num_samples=50, chunk_size=20)
    a = estimate(lg_params, lg_data[:40], jax.random.key(0))
    b = estimate(lg_params, lg_data[:40], jax.random.key(0))
    c = estimate(lg_params, lg_data[:40], jax.random.key(1))
    np.testing.assert_array_equal(a.log_px, b.log_px)
    assert not np.allclose(a.log_px, c.log_px)


def test_chunks_draw_distinct_samples(lg_model, lg_params, lg_data):
    """Each chunk gets its own key: no chunk repeats another's samples (a key-reuse bug would)."""
    log_w = jax.jit(lambda x, k: likelihood.chunked_log_weights(lg_model, lg_params, x, k, 1000, 300))(
        lg_data[0], jax.random.key(0))
    chex.assert_shape(log_w, (1000,))
    assert np.unique(np.asarray(log_w)).size == 1000


def test_weight_statistics_against_numpy():
    """The stabilised statistics equal their float64 definitions, even for log-weights around -1000 (where the
    unnormalised weights underflow)."""
    rng = np.random.default_rng(0)
    log_w = (-1000.0 + 3.0 * rng.standard_normal((4, 200))).astype(np.float32)
    stats = jax.jit(likelihood.weight_statistics)(log_w)
    for field in stats:
        chex.assert_shape(field, (4,))
    lw = log_w.astype(np.float64)
    k = lw.shape[1]
    ref_log_px = scipy.special.logsumexp(lw, axis=1) - math.log(k)
    v = np.exp(lw - lw.max(axis=1, keepdims=True))
    ref_ess = v.sum(1) ** 2 / (v**2).sum(1)
    ref_se = v.std(1) / (math.sqrt(k) * v.mean(1))
    # float32 values near -1000 have ulp 6e-5: compare log p(x) to 2e-4 absolute; the rest are relative.
    np.testing.assert_allclose(stats.log_px, ref_log_px, rtol=0, atol=2e-4)
    np.testing.assert_allclose(stats.elbo, lw.mean(1), rtol=0, atol=2e-4)
    np.testing.assert_allclose(stats.ess, ref_ess, rtol=1e-4)
    np.testing.assert_allclose(stats.stderr, ref_se, rtol=1e-4)


def test_vae_log_likelihood_shapes_and_bounds(small_vae, small_vae_params, digits):
    est = log_likelihood(small_vae, small_vae_params, digits.x_test[:7], jax.random.key(0), num_samples=64,
                         chunk_size=16, batch_size=4, progress=False)
    for field in est:
        chex.assert_shape(field, (7,))
    assert np.all(np.isfinite(np.asarray(est.log_px)))
    assert np.all(np.asarray(est.elbo) <= np.asarray(est.log_px) + 1e-5)  # Jensen on the same weights


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), r"num_samples \(the number of Monte Carlo / importance samples K\) must be an integer >= 1"),
    (dict(num_samples=-3), r"num_samples .* must be an integer >= 1, got -3"),
    (dict(num_samples=2.5), r"must be an integer >= 1, got 2.5"),
    (dict(chunk_size=0), r"chunk_size .* must be an integer >= 1"),
    (dict(batch_size=0), r"batch_size .* must be an integer >= 1"),
])
def test_log_likelihood_bad_arguments(lg_model, lg_params, lg_data, kwargs, match, assert_one_line):
    with pytest.raises(ValueError, match=match) as err:
        log_likelihood(lg_model, lg_params, lg_data, jax.random.key(0), progress=False, **kwargs)
    assert_one_line(err.value)


def test_log_likelihood_empty_data(lg_model, lg_params, assert_one_line):
    with pytest.raises(ValueError, match="empty dataset") as err:
        log_likelihood(lg_model, lg_params, np.zeros((0, 5), np.float32), jax.random.key(0), progress=False)
    assert_one_line(err.value)


def test_naive_prior_estimate_converges_to_exact_log_px(lg_model, lg_params, lg_data, lg_exact_log_px):
    """proposal="prior": w_k = p(x | z_k), z_k ~ p(z), unbiased for p(x). On the 5-d linear-Gaussian model the prior
    is a workable proposal (ESS ~1-10% of K): with K = 20,000 the estimate is within 4 delta-method standard errors
    (+ 0.01 for the estimator's O(1/K) bias) of the exact log p(x) at every point; with K = 10 it is far worse."""
    x, exact = lg_data[:30], np.asarray(lg_exact_log_px[:30], np.float64)
    est = log_likelihood(lg_model, lg_params, x, jax.random.key(4), num_samples=20000, chunk_size=5000,
                         progress=False, proposal="prior")
    err = np.asarray(est.log_px, np.float64) - exact
    np.testing.assert_array_less(np.abs(err), 4 * np.asarray(est.stderr) + 0.01)
    assert np.all(np.asarray(est.ess) < 20000 * 0.5)  # the prior wastes most samples
    small = log_likelihood(lg_model, lg_params, x, jax.random.key(4), num_samples=10, progress=False,
                           proposal="prior")
    assert np.mean(np.abs(np.asarray(small.log_px) - exact)) > 5 * np.mean(np.abs(err))
    # The weights are p(x | z) for z ~ p(z): the mean log-weight is E_p(z)[log p(x|z)] < log p(x) (Jensen).
    assert np.all(np.asarray(est.elbo) < exact)


def test_prior_log_weights_are_the_likelihood_at_prior_draws(lg_model, lg_params, lg_data):
    x, key = lg_data[0], jax.random.key(0)
    log_w = jax.jit(lambda k: likelihood.prior_log_weights(lg_model, lg_params, x, k, 7))(key)
    z = lg_model.prior(lg_params).sample(seed=key, sample_shape=7)
    np.testing.assert_allclose(log_w, lg_model.decode(lg_params, z).log_prob(x), rtol=1e-6)
    # The generic proposal form with r = q(z|x) reproduces the model's own log-weights (same key, same z).
    q = lg_model.encode(lg_params, x)
    np.testing.assert_allclose(likelihood.proposal_log_weights(lg_model, lg_params, x, q, key, 7),
                               lg_model.log_weights(lg_params, x, key, 7), rtol=1e-6)


def test_block_estimates_against_numpy():
    rng = np.random.default_rng(1)
    log_w = (rng.standard_normal((3, 1003)) * 2 - 50).astype(np.float32)
    for k in (1, 10, 1000):
        ours = np.asarray(likelihood.block_estimates(jnp.asarray(log_w), k))
        n = 1003 // k
        ref = scipy.special.logsumexp(log_w[:, : n * k].reshape(3, n, k).astype(np.float64), axis=-1) - math.log(k)
        chex.assert_shape(ours, (3, n))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)  # float32 near -50: ulp 4e-6
    with pytest.raises(ValueError, match="larger than the 1003 log-weights"):
        likelihood.block_estimates(jnp.asarray(log_w), 2000)


def test_unknown_proposal(lg_model, lg_params, lg_data, assert_one_line):
    with pytest.raises(ValueError, match="unknown proposal 'posterior'; choose one of q, prior") as err:
        log_likelihood(lg_model, lg_params, lg_data, jax.random.key(0), progress=False, proposal="posterior")
    assert_one_line(err.value)
