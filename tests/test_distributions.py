"""distributions.py: KL divergences, reparameterised gradients, the continuous Bernoulli, likelihood families.

References: closed forms, distrax's own KLs, scipy.stats, and torch.distributions.ContinuousBernoulli.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch
from jax.test_util import check_grads

from dlvm_jax import distributions as dists
from dlvm_jax import objectives
from dlvm_jax.models import VAE, VAEConfig

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import distrax


def _random_diag(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(loc, scale) of a random diagonal Gaussian, as float32 numpy arrays (no JAX work outside jit)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape).astype(np.float32),
            np.exp(0.5 * rng.standard_normal(shape)).astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# KL divergences
# ----------------------------------------------------------------------------------------------------------


def test_kl_diag_matches_distrax_and_closed_form():
    q_loc, q_scale = _random_diag(0, (3, 4))
    p_loc, p_scale = _random_diag(1, (3, 4))

    @jax.jit
    def kls(q_loc, q_scale, p_loc, p_scale):
        q, p = dists.diag_gaussian(q_loc, q_scale), dists.diag_gaussian(p_loc, p_scale)
        return (dists.kl_divergence(q, p), q.kl_divergence(p), dists.kl_diag_gaussians(q_loc, q_scale, p_loc, p_scale),
                dists.kl_divergence(q, q))

    ours, distrax_kl, direct, self_kl = kls(q_loc, q_scale, p_loc, p_scale)
    assert ours.shape == (3,)
    # Same quantity computed by two float32 implementations, values O(1-10): 1e-5 (relative and absolute) is a
    # few ulps of rounding in a sum of 4 terms, far below any formula error (a wrong term is off by O(1)).
    np.testing.assert_allclose(ours, distrax_kl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(direct, ours, rtol=1e-6)
    # Closed form in float64 numpy.
    ql, qs, pl, ps = (np.asarray(a, np.float64) for a in (q_loc, q_scale, p_loc, p_scale))
    ref = np.sum(np.log(ps / qs) + (qs**2 + (ql - pl) ** 2) / (2 * ps**2) - 0.5, axis=-1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # KL(q || q) = 0 and KL(q || p) > 0.
    np.testing.assert_allclose(self_kl, 0.0, atol=1e-6)
    assert np.all(np.asarray(ours) > 0)


def test_kl_full_gaussian_against_closed_form():
    """The non-diagonal path (distrax's own KL) against the float64 closed form."""
    d = 3
    loc = np.array([0.3, -1.0, 0.5], np.float32)
    tril = np.array([[1.2, 0.0, 0.0], [0.4, 0.7, 0.0], [-0.3, 0.2, 0.5]], np.float32)
    ours = float(jax.jit(lambda m, t: dists.kl_divergence(dists.full_gaussian(m, t), dists.standard_normal(d)))(
        loc, tril))
    cov = tril.astype(np.float64) @ tril.astype(np.float64).T
    mu = loc.astype(np.float64)
    ref = 0.5 * (np.trace(cov) + mu @ mu - d - np.linalg.slogdet(cov)[1])
    # float32 Cholesky/log-det of a well-conditioned 3x3 matrix: relative error ~1e-6; 1e-5 leaves a margin.
    assert ours == pytest.approx(ref, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("case", ["diag_vs_standard", "diag_vs_diag", "full_vs_standard"])
def test_analytic_kl_matches_monte_carlo(case):
    d = 4
    q_loc, q_scale = _random_diag(42, (d,))
    p_loc, p_scale = _random_diag(43, (d,))
    tril = np.tril(0.3 * np.random.default_rng(44).standard_normal((d, d)), -1).astype(np.float32) + np.diag(q_scale)
    n = 200_000

    @jax.jit
    def mc_terms_and_kl(key):
        q = dists.full_gaussian(q_loc, tril) if case == "full_vs_standard" else dists.diag_gaussian(q_loc, q_scale)
        p = dists.diag_gaussian(p_loc, p_scale) if case == "diag_vs_diag" else dists.standard_normal(d)
        z = q.sample(seed=key, sample_shape=n)
        return q.log_prob(z) - p.log_prob(z), dists.kl_divergence(q, p)

    terms, analytic = mc_terms_and_kl(jax.random.key(0))
    terms = np.asarray(terms, np.float64)
    mc, se = terms.mean(), terms.std(ddof=1) / math.sqrt(n)
    # A statistical comparison: the MC mean is unbiased with standard error `se`; 3 standard errors fail a
    # correct implementation with probability ~0.3% (and the key is fixed, so the test is deterministic).
    assert abs(mc - float(analytic)) < 3 * se, (mc, float(analytic), se)
    assert se < 0.05 * max(float(analytic), 0.1)  # the comparison is sharp enough to catch a wrong term


# ----------------------------------------------------------------------------------------------------------
# Gradients through reparameterised samples
# ----------------------------------------------------------------------------------------------------------


def test_reparameterised_gradient_is_pathwise():
    """d/dmu of mean(z^2), z = mu + sigma * eps drawn by distrax, equals 2 mean(z) exactly (pathwise identity);
    d/dsigma equals 2 mean(z * eps)."""
    mu, sigma = jnp.array([0.5, -1.0]), jnp.array([0.8, 1.5])
    key = jax.random.key(3)
    n = 1000

    def f(mu, sigma):
        return jnp.mean(jnp.sum(dists.diag_gaussian(mu, sigma).sample(seed=key, sample_shape=n) ** 2, axis=-1))

    @jax.jit
    def grads_and_samples(mu, sigma):
        return jax.grad(f, argnums=(0, 1))(mu, sigma), dists.diag_gaussian(mu, sigma).sample(seed=key, sample_shape=n)

    (g_mu, g_sigma), z = grads_and_samples(mu, sigma)
    z = np.asarray(z, np.float64)
    eps = (z - np.asarray(mu)) / np.asarray(sigma)
    # Identities on the same samples, float32 sums of 1000 terms: 1e-5 relative.
    np.testing.assert_allclose(g_mu, 2 * z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_sigma, 2 * (z * eps).mean(0), rtol=1e-5, atol=1e-6)


def test_reparameterised_kl_gradient_matches_analytic():
    """The MC-KL gradient (score term included) is an unbiased estimate of the analytic KL gradient:
    for p = N(0, I), dKL/dmu = mu and dKL/dsigma = sigma - 1/sigma."""
    mu, sigma = jnp.array([0.7, -0.4, 1.5]), jnp.array([0.6, 1.3, 0.9])
    p = dists.standard_normal(3)

    def one_sample(theta, key):
        q = dists.diag_gaussian(theta[0], theta[1])
        z = q.sample(seed=key)
        return q.log_prob(z) - p.log_prob(z)

    n = 20_000

    @jax.jit
    def mc_and_analytic(theta, key):
        grads = jax.vmap(jax.grad(one_sample), in_axes=(None, 0))(theta, jax.random.split(key, n))
        analytic = jax.grad(lambda th: dists.kl_divergence(dists.diag_gaussian(*th), p))(theta)
        return grads, analytic

    grads, analytic = mc_and_analytic((mu, sigma), jax.random.key(5))
    np.testing.assert_allclose(analytic[0], mu, rtol=1e-6)
    np.testing.assert_allclose(analytic[1], sigma - 1 / sigma, rtol=1e-5)
    for g, a in zip(grads, analytic):
        g = np.asarray(g, np.float64)
        mean, se = g.mean(0), g.std(0, ddof=1) / math.sqrt(n)
        assert np.all(np.isfinite(g))
        # Statistical: within 4 standard errors per coordinate (6 coordinates; false alarm < 0.04%).
        np.testing.assert_array_less(np.abs(mean - np.asarray(a)), 4 * se)


def test_vae_gradient_flows_through_samples(small_vae, small_vae_params, digits):
    """The reconstruction term depends on the encoder ONLY through z ~ q: its gradient w.r.t. the encoder is
    non-zero iff sampling is reparameterised."""
    x = jnp.asarray(digits.x_train[:8])
    keys = jax.random.split(jax.random.key(0), 8)

    def rec(params):
        terms = jax.vmap(lambda xi, k: objectives.elbo_terms(small_vae, params, xi, k, analytic_kl=False))(x, keys)
        return jnp.mean(terms["rec"])

    grads = jax.device_get(jax.jit(jax.grad(rec))(small_vae_params)["encoder"])
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in leaves))
    assert norm > 1e-3, norm


def test_vae_elbo_gradient_matches_finite_differences():
    """With the key fixed, the MC ELBO is a smooth deterministic function of the parameters: reverse-mode
    gradients match central finite differences (jax.test_util.check_grads) in float64."""
    model = VAE(VAEConfig(data_shape=(6,), latent_dim=2, hidden=(5,), likelihood="gaussian"))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.jit(model.init)(jax.random.key(0)))
        x = jnp.asarray(np.random.default_rng(1).standard_normal(6))
        key = jax.random.key(2)

        @jax.jit
        def f(params):
            return objectives.elbo(model, params, x, key, num_samples=3, analytic_kl=False)

        assert f(params).dtype == jnp.float64
        # check_grads' float64 default tolerance (1e-5) with its default step: a float64 central difference of
        # a smooth function is accurate to ~1e-8, so a wrong gradient path would be far outside.
        check_grads(f, (params,), order=1, modes=("rev",))


# ----------------------------------------------------------------------------------------------------------
# Continuous Bernoulli
# ----------------------------------------------------------------------------------------------------------

_PROBS = np.concatenate([
    [1e-3, 0.01, 0.1, 0.3, 0.45, 0.49, 0.4975, 0.4985, 0.4995, 0.4999, 0.5, 0.5001, 0.5005, 0.5015, 0.5025,
     0.51, 0.7, 0.9, 0.99, 0.999],
    np.linspace(0.499, 0.501, 21),  # torch's own Taylor region (its `lims`)
])
#: Logits on both sides of every branch point: torch's region p in (0.499, 0.501], dlvm_jax's Taylor
#: region |logit| < 1e-2, logit exactly 0, and large |logit|.
CB_LOGITS = np.unique(np.concatenate([
    np.log(_PROBS) - np.log1p(-_PROBS),
    [-20.0, -10.0, -1.0, -0.31, -0.29, -0.0101, -0.0099, -1e-3, -1e-6, 1e-6, 1e-3, 0.0099, 0.0101, 0.02, 0.29, 0.31,
     1.0, 10.0, 20.0],
]).astype(np.float32).astype(np.float64))  # float32-representable, so both dtypes see the same logits
CB_X = np.linspace(0.0, 1.0, 11)


_cb_log_prob = jax.jit(lambda eta, x: dists.ContinuousBernoulli(eta).log_prob(x))
_cb_icdf = jax.jit(lambda eta, u: dists.ContinuousBernoulli(eta)._icdf(u))
_cb_mean = jax.jit(lambda eta: dists.ContinuousBernoulli(eta).mean())


def _torch_cb(logits: np.ndarray) -> torch.distributions.ContinuousBernoulli:
    return torch.distributions.ContinuousBernoulli(logits=torch.tensor(logits, dtype=torch.float64))


def test_continuous_bernoulli_log_prob_matches_torch():
    """log_prob against torch in float64, and dlvm_jax's default float32 against the same float64 reference.

    Why float64 for the reference: torch's float32 implementation clamps probs to 1 - eps(float32) (logit 20
    becomes ~16) and evaluates log|1 - 2p| with cancellation near p = 1/2, so it is itself off by up to 0.2 nats
    there; in float64 both effects are below 1e-8. dlvm_jax is evaluated in float64 under `jax.enable_x64(True)`
    (a context manager in jax 0.10) and, separately, in its default float32.
    """
    lg, xg = np.meshgrid(CB_LOGITS, CB_X, indexing="ij")
    ref = _torch_cb(lg).log_prob(torch.tensor(xg, dtype=torch.float64)).numpy()
    with jax.enable_x64(True):
        ours64 = _cb_log_prob(jnp.asarray(lg, jnp.float64), jnp.asarray(xg, jnp.float64))
        assert ours64.dtype == jnp.float64
        ours64 = np.asarray(ours64)
    ours32 = _cb_log_prob(jnp.asarray(lg, jnp.float32), jnp.asarray(xg, jnp.float32))
    assert ours32.dtype == jnp.float32
    # 1e-5 nats absolute (the acceptance tolerance). float32 log-densities of magnitude <= ~20 have rounding
    # ~2e-6, so float32 must meet it too: that is what checks stability near p = 1/2 in the default dtype.
    np.testing.assert_allclose(ours64, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours32), ref, rtol=0, atol=1e-5)


def test_continuous_bernoulli_log_normalizer_even_and_continuous():
    # The normaliser switches to its series at |eta| = 2e-2 (y = |eta| / 2 < 1e-2).
    eta = np.array([0.0, 1e-4, 5e-3, 0.0199999, 0.0200001, 0.5, 3.0, 40.0], np.float32)
    log_c = np.asarray(jax.jit(lambda e: jnp.stack([dists.cb_log_normalizer(e), dists.cb_log_normalizer(-e)]))(eta))
    np.testing.assert_allclose(log_c[0], log_c[1], rtol=0, atol=1e-7)  # even in eta
    assert log_c[0, 0] == pytest.approx(math.log(2.0), abs=1e-7)
    # Continuity across the switch (float32 rounding ~1e-7); the true function changes by ~1e-8 here.
    assert abs(log_c[0, 3] - log_c[0, 4]) < 1e-6
    # Against the float64 closed form log(eta / tanh(eta / 2)).
    e64 = eta[1:].astype(np.float64)
    np.testing.assert_allclose(log_c[0, 1:], np.log(e64 / np.tanh(e64 / 2)), rtol=0, atol=1e-6)


_cb_density = jax.jit(lambda eta, x: jnp.exp(dists.ContinuousBernoulli(eta).log_prob(x)))


@pytest.mark.parametrize("logit", [0.0, 1e-3, -1e-3, 1e-2, -1e-2, 1.0, -1.0, 10.0, -10.0, 50.0, -50.0])
def test_continuous_bernoulli_density_integrates_to_one(logit):
    eta = jnp.float32(logit)
    # Adaptive quadrature, and Simpson's rule on a fine grid as a second, independent rule.
    quad, _ = scipy.integrate.quad(lambda x: float(_cb_density(eta, jnp.float32(x))), 0.0, 1.0, epsabs=1e-10,
                                   limit=200)
    grid = np.linspace(0.0, 1.0, 20001)
    simpson = scipy.integrate.simpson(np.asarray(_cb_density(eta, jnp.asarray(grid, jnp.float32)), np.float64),
                                      x=grid)
    # 1e-4: the acceptance tolerance. float32 densities carry relative error ~1e-6 and both rules are far more
    # accurate than that (Simpson's error with h = 5e-5 is < 1e-9 even for |logit| = 50), so a normaliser
    # wrong by 1e-4 nats would show.
    assert quad == pytest.approx(1.0, abs=1e-4)
    assert simpson == pytest.approx(1.0, abs=1e-4)


def _exact_icdf(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """float64 inverse CDF, F^{-1}(u) = log1p(u expm1(eta)) / eta (u at eta = 0); no cancellation for small eta."""
    safe = np.where(logits == 0, 1.0, logits)
    return np.where(logits == 0, u, np.log1p(u * np.expm1(safe)) / safe)


def test_continuous_bernoulli_icdf_matches_torch_and_exact():
    # u as float32 values (the sampler draws float32 u in [1e-7, 1 - 1e-7]), tails included.
    u_grid = np.concatenate([[1e-7, 1e-5], np.linspace(1e-3, 1 - 1e-3, 15), [1 - 1e-5, 1 - 1e-7]])
    u_grid = u_grid.astype(np.float32).astype(np.float64)
    lg, ug = np.meshgrid(np.concatenate([CB_LOGITS, [-50.0, 50.0]]), u_grid, indexing="ij")
    tdist = _torch_cb(lg)
    torch_icdf = tdist.icdf(torch.tensor(ug, dtype=torch.float64)).numpy()
    # torch replaces the icdf by u itself for p in (0.499, 0.501] (an O(logit) approximation), and clamps p to
    # 1 - eps(float64) (logit 50 is out of its reach): compare with it outside those regions only, and with
    # the exact float64 formula everywhere.
    outside = tdist._outside_unstable_region().numpy() & (np.abs(lg) <= 20)
    exact = _exact_icdf(lg, ug)
    np.testing.assert_allclose(torch_icdf[outside], exact[outside], atol=1e-8)  # the reference itself
    with jax.enable_x64(True):
        ours64 = np.asarray(_cb_icdf(jnp.asarray(lg), jnp.asarray(ug)))
    ours32 = np.asarray(_cb_icdf(jnp.asarray(lg, jnp.float32), jnp.asarray(ug, jnp.float32)))
    # Samples live in [0, 1] where float32 resolution is 6e-8; 1e-5 allows for the series switch and rounding
    # (the implementation is within ~4e-7 of the float64 formula on this grid, tails included).
    np.testing.assert_allclose(ours64[outside], torch_icdf[outside], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours64, exact, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours32, exact, rtol=0, atol=1e-5)
    # The icdf is increasing in u.
    assert np.all(np.diff(ours32, axis=1) > 0)


def test_continuous_bernoulli_mean_matches_torch():
    tmean = _torch_cb(CB_LOGITS).mean.numpy()
    with jax.enable_x64(True):
        ours64 = np.asarray(_cb_mean(jnp.asarray(CB_LOGITS)))
    ours32 = np.asarray(_cb_mean(jnp.asarray(CB_LOGITS, jnp.float32)))
    # torch's mean uses a 3rd-order series in p - 1/2 inside its region: accurate to ~1e-12 in float64.
    np.testing.assert_allclose(ours64, tmean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours32, tmean, rtol=0, atol=1e-5)
    assert float(_cb_mean(jnp.float32(0.0))) == 0.5


def test_continuous_bernoulli_samples():
    logits = np.array([-10.0, -1.0, -1e-3, 0.0, 1e-3, 2.0, 10.0], np.float32)
    dist = dists.ContinuousBernoulli(jnp.asarray(logits))
    n = 20_000
    x = jax.jit(lambda k: dist.sample(seed=k, sample_shape=n))(jax.random.key(7))
    assert x.shape == (n, logits.size) and x.dtype == jnp.float32
    x = np.asarray(x, np.float64)
    assert np.all((x >= 0) & (x <= 1))
    mean, se = x.mean(0), x.std(0, ddof=1) / math.sqrt(n)
    # Statistical: the sample mean within 4 standard errors of .mean() (false alarm < 1e-4 per logit).
    np.testing.assert_array_less(np.abs(mean - np.asarray(_cb_mean(jnp.asarray(logits)), np.float64)), 4 * se)
    # Whole distribution: Kolmogorov-Smirnov against the exact CDF F(x) = expm1(eta x) / expm1(eta).
    for j, eta in enumerate(logits.astype(np.float64)):
        cdf = (lambda v: v) if eta == 0 else (lambda v, e=eta: np.expm1(e * v) / np.expm1(e))
        assert scipy.stats.kstest(x[:, j], cdf).pvalue > 1e-3, eta
    # Indexing keeps the class.
    assert isinstance(dist[2:4], dists.ContinuousBernoulli) and dist[2:4].batch_shape == (2,)


def test_continuous_bernoulli_gradients():
    """Exponential family: d log p(x) / d eta = x - E[x], including at and near eta = 0 (the series branches);
    the reparameterised sample x = F^{-1}(u; eta) has a finite derivative that matches finite differences."""
    logits = np.array([0.0, 1e-3, -1e-3, 0.0099, 0.0101, -0.29, 0.31, -0.5, 5.0, -20.0], np.float32)
    lg, xg = (a.ravel() for a in np.meshgrid(logits, np.array([0.0, 0.3, 1.0], np.float32), indexing="ij"))
    score = jax.jit(jax.vmap(jax.grad(lambda e, x: dists.ContinuousBernoulli(e).log_prob(x))))(lg, xg)
    expected = xg - np.asarray(_cb_mean(jnp.asarray(lg)))
    # float32 derivatives of O(1) terms: 1e-5 absolute.
    np.testing.assert_allclose(score, expected, rtol=0, atol=1e-5)
    u = np.linspace(0.05, 0.95, 7)
    lg, ug = (a.ravel() for a in np.meshgrid(logits.astype(np.float64), u, indexing="ij"))
    with jax.enable_x64(True):
        icdf = jax.jit(jax.vmap(lambda e, u: dists.ContinuousBernoulli(e)._icdf(u)))
        dx = jax.jit(jax.vmap(jax.grad(lambda e, u: dists.ContinuousBernoulli(e)._icdf(u))))(lg, ug)
        h = 1e-7  # central difference inside one branch (every logit is >= 1e-4 away from a switch or exactly 0)
        fd = (icdf(lg + h, ug) - icdf(lg - h, ug)) / (2 * h)
    assert np.all(np.isfinite(dx))
    # No NaN/inf gradients at extreme logits either (float32, where e^{|eta|} overflows).
    big = jnp.array([-100.0, -60.0, 60.0, 100.0])
    for fn in (lambda e: dists.ContinuousBernoulli(e).mean(), lambda e: dists.ContinuousBernoulli(e).log_prob(0.3),
               lambda e: dists.ContinuousBernoulli(e)._icdf(jnp.float32(1e-7)),
               lambda e: dists.ContinuousBernoulli(e)._icdf(jnp.float32(1 - 1e-7))):
        assert bool(jnp.all(jnp.isfinite(jax.jit(jax.vmap(jax.grad(fn)))(big))))
    # float64 central difference: truncation ~h^2 and rounding ~1e-16/h = 1e-9; the series branch differs from
    # the true derivative by O(eta^2) < 1e-5.
    np.testing.assert_allclose(dx, fd, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Likelihood families
# ----------------------------------------------------------------------------------------------------------

DATA_SHAPE = (2, 3)


def _log_prob_and_mean(likelihood: str, params: np.ndarray, x: np.ndarray):
    """(batch_shape, event_shape, log_prob(x), mean) of likelihood_dist, computed under one jit."""
    shapes = {}

    @jax.jit
    def f(params, x):
        dist = dists.likelihood_dist(likelihood, params, DATA_SHAPE)
        shapes["batch"], shapes["event"] = dist.batch_shape, dist.event_shape
        return dist.log_prob(x), dists.likelihood_mean(dist)

    log_prob, mean = f(params, x)
    return shapes["batch"], shapes["event"], np.asarray(log_prob), np.asarray(mean)


def test_bernoulli_likelihood_matches_scipy():
    rng = np.random.default_rng(0)
    params = (3 * rng.standard_normal((4, 6))).astype(np.float32)
    x = (rng.uniform(size=(4,) + DATA_SHAPE) < 0.4).astype(np.float32)
    batch, event, lp, mean = _log_prob_and_mean("bernoulli", params, x)
    assert event == DATA_SHAPE and batch == (4,) and lp.shape == (4,)
    probs = scipy.special.expit(params.astype(np.float64)).reshape((4,) + DATA_SHAPE)
    ref = scipy.stats.bernoulli.logpmf(x, probs).reshape(4, -1).sum(-1)
    # float32 sums of 6 log-probabilities of magnitude < 10: 1e-5 relative/absolute.
    np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, probs, rtol=1e-5, atol=1e-6)


def test_softplus_equals_jax_softplus_with_sigmoid_gradient():
    x = np.concatenate([[0.0, -0.0, 1e-8, -1e-8], np.linspace(-90, 90, 181), np.random.default_rng(2).standard_normal(100)]
                       ).astype(np.float32)
    np.testing.assert_allclose(jax.jit(dists.softplus)(x), jax.jit(jax.nn.softplus)(x), rtol=1e-6, atol=1.2e-7)
    dense = np.linspace(-40, 40, 200001).astype(np.float32)  # against float64: within 1.2e-7 everywhere
    np.testing.assert_allclose(jax.jit(dists.softplus)(dense), np.logaddexp(0.0, dense.astype(np.float64)),
                               rtol=1e-6, atol=1.2e-7)
    grad = jax.jit(jax.vmap(jax.grad(dists.softplus)))(x)
    np.testing.assert_allclose(grad, scipy.special.expit(x.astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert float(grad[0]) == 0.5  # at x = 0 exactly, where max(x, 0) and |x| alone would give 0


def test_bernoulli_log_prob_equals_distrax_in_value_and_gradient():
    """The lean Bernoulli.log_prob (x l - softplus(l)) is distrax's Bernoulli.log_prob in value and gradient,
    for binary and grey-level x, across logits from -30 to 30 (float64 reference: scipy's log expit)."""
    rng = np.random.default_rng(1)
    logits = np.concatenate([np.linspace(-30, 30, 61), 4 * rng.standard_normal(200)]).astype(np.float32)
    for x in ((rng.uniform(size=logits.shape) < 0.5).astype(np.float32),
              rng.uniform(size=logits.shape).astype(np.float32)):
        ours = jax.jit(lambda l, x: dists.Bernoulli(l).log_prob(x))
        theirs = jax.jit(lambda l, x: distrax.Bernoulli(logits=l).log_prob(x))
        l64, x64 = logits.astype(np.float64), x.astype(np.float64)
        ref = x64 * scipy.special.log_expit(l64) + (1 - x64) * scipy.special.log_expit(-l64)
        # float32: x l - softplus(l) rounds at the ulp of |l| (< 4e-6 at |l| = 30).
        np.testing.assert_allclose(ours(logits, x), ref, rtol=1e-6, atol=4e-6)
        np.testing.assert_allclose(ours(logits, x), theirs(logits, x), rtol=1e-6, atol=4e-6)
        g_ours = jax.jit(jax.grad(lambda l, x: dists.Bernoulli(l).log_prob(x).sum()))(logits, x)
        g_theirs = jax.jit(jax.grad(lambda l, x: distrax.Bernoulli(logits=l).log_prob(x).sum()))(logits, x)
        np.testing.assert_allclose(g_ours, x64 - scipy.special.expit(l64), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-5, atol=1e-6)
    dist = dists.Bernoulli(jnp.asarray(logits))
    assert isinstance(dist, distrax.Bernoulli)
    assert isinstance(dist[2:4], dists.Bernoulli) and dist[2:4].batch_shape == (2,)


def test_gaussian_likelihood_matches_scipy():
    rng = np.random.default_rng(1)
    params = rng.standard_normal((4, 12)).astype(np.float32)
    x = rng.standard_normal((4,) + DATA_SHAPE).astype(np.float32)
    batch, event, lp, mean = _log_prob_and_mean("gaussian", params, x)
    assert event == DATA_SHAPE and batch == (4,) and lp.shape == (4,)
    p = params.astype(np.float64)
    loc = p[:, :6].reshape((4,) + DATA_SHAPE)  # first half: means, second half: raw scales (flat, in order)
    scale = (np.logaddexp(0.0, p[:, 6:]) + dists.MIN_SCALE).reshape((4,) + DATA_SHAPE)  # softplus + floor
    ref = scipy.stats.norm.logpdf(x.astype(np.float64), loc, scale).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, loc, rtol=1e-6, atol=1e-6)


def test_continuous_bernoulli_likelihood_sums_over_event():
    rng = np.random.default_rng(2)
    params = rng.standard_normal((3, 5, 6)).astype(np.float32)  # two leading batch axes, e.g. (K, B)
    x = rng.uniform(size=(3, 5) + DATA_SHAPE).astype(np.float32)
    batch, event, lp, mean = _log_prob_and_mean("continuous_bernoulli", params, x)
    assert event == DATA_SHAPE and batch == (3, 5) and lp.shape == (3, 5)
    tdist = _torch_cb(params.astype(np.float64).reshape((3, 5) + DATA_SHAPE))
    ref = tdist.log_prob(torch.tensor(x, dtype=torch.float64)).numpy().reshape(3, 5, -1).sum(-1)
    np.testing.assert_allclose(lp, ref, rtol=0, atol=1e-5)  # float32 sum of 6 terms against float64 torch
    np.testing.assert_allclose(mean, tdist.mean.numpy(), rtol=0, atol=1e-5)


def test_likelihood_helpers_and_errors(assert_one_line):
    assert dists.likelihood_param_size("gaussian", 10) == 20
    assert dists.likelihood_param_size("bernoulli", 10) == 10
    assert dists.likelihood_param_size("continuous_bernoulli", 10) == 10
    scale = dists.positive_scale(jnp.array([-100.0, 0.0, 100.0]))
    assert float(scale[0]) >= dists.MIN_SCALE and float(scale[1]) == pytest.approx(math.log(2) + dists.MIN_SCALE)
    q = dists.diag_gaussian_from_raw(jnp.array([1.0, 2.0, -50.0, 0.0]))
    assert q.event_shape == (2,)
    np.testing.assert_allclose(q.loc, [1.0, 2.0])
    np.testing.assert_allclose(q.scale_diag, [dists.MIN_SCALE, math.log(2) + dists.MIN_SCALE], rtol=1e-5)
    assert isinstance(dists.standard_normal(3), distrax.MultivariateNormalDiag)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'; choose one of") as err:
        dists.likelihood_dist("poisson", jnp.zeros((4,)), (4,))
    assert_one_line(err.value)


# ----------------------------------------------------------------------------------------------------------
# Short-axis reductions and the closed-form diagonal Gaussian
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 50])
def test_sum_last_and_logsumexp_last_match_jax(n):
    x = np.random.default_rng(n).standard_normal((3, 4, n)).astype(np.float32) * 5
    np.testing.assert_allclose(np.asarray(dists.sum_last(x)), x.sum(-1), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dists.logsumexp_last(x)), scipy.special.logsumexp(x, axis=-1),
                               rtol=1e-6, atol=1e-5)
    # gradients: d/dx sum = 1, d/dx logsumexp = softmax
    g = jax.grad(lambda a: jnp.sum(dists.logsumexp_last(a) * jnp.arange(1.0, 5.0)[None, :]))(jnp.asarray(x))
    expected = scipy.special.softmax(x.astype(np.float64), axis=-1) * np.arange(1.0, 5.0)[None, :, None]
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-5, atol=1e-6)


def test_logsumexp_last_infinities():
    x = jnp.asarray([[-jnp.inf, -jnp.inf, -jnp.inf], [0.0, -jnp.inf, 1.0], [jnp.inf, 0.0, 1.0], [1e30, 1e30, 0.0]])
    out = np.asarray(dists.logsumexp_last(x))
    assert out[0] == -np.inf
    np.testing.assert_allclose(out[1], np.log(1 + np.e), rtol=1e-6)
    assert out[2] == np.inf
    np.testing.assert_allclose(out[3], 1e30 + np.log(2.0), rtol=1e-6)  # no overflow


@pytest.mark.parametrize("dim", [1, 2, 5, 20])
def test_diag_gaussian_log_prob_matches_distrax_and_scipy(dim):
    loc, scale = _random_diag(dim, (6, 3, dim))
    x = np.random.default_rng(100 + dim).standard_normal((6, 1, dim)).astype(np.float32)  # broadcasts over axis 1
    ours = dists.diag_gaussian(jnp.asarray(loc), jnp.asarray(scale))
    assert isinstance(ours, distrax.MultivariateNormalDiag)
    ref = scipy.stats.norm(loc.astype(np.float64), scale.astype(np.float64)).logpdf(x.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(np.asarray(ours.log_prob(x)), ref, rtol=1e-5, atol=1e-4)
    theirs = distrax.MultivariateNormalDiag(jnp.asarray(loc), jnp.asarray(scale))
    np.testing.assert_allclose(np.asarray(ours.log_prob(x)), np.asarray(theirs.log_prob(x)), rtol=1e-5, atol=1e-4)
    # gradients in loc, scale and x agree with distrax's log_prob
    f = lambda m, s, v, cls: jnp.sum(cls(m, s).log_prob(v))  # noqa: E731
    ga = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(loc), jnp.asarray(scale), jnp.asarray(x), dists.MultivariateNormalDiag)
    gb = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(loc), jnp.asarray(scale), jnp.asarray(x),
                                        distrax.MultivariateNormalDiag)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # indexing keeps the class (and its log_prob)
    sub = ours[2]
    assert isinstance(sub, dists.MultivariateNormalDiag) and sub.batch_shape == (3,)
    np.testing.assert_allclose(np.asarray(sub.log_prob(x[2])), ref[2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("data_shape", [(2,), (28, 28, 1)])
def test_independent_log_prob_sums_the_event_like_distrax(data_shape):
    rng = np.random.default_rng(7)
    raw = rng.standard_normal((4, 2 * math.prod(data_shape))).astype(np.float32)
    x = rng.standard_normal((4,) + data_shape).astype(np.float32)
    ours = dists.likelihood_dist("gaussian", jnp.asarray(raw), data_shape)
    assert isinstance(ours, dists.Independent) and ours.event_shape == data_shape
    theirs = distrax.Independent(ours.distribution, reinterpreted_batch_ndims=len(data_shape))
    np.testing.assert_allclose(np.asarray(ours.log_prob(x)), np.asarray(theirs.log_prob(x)), rtol=1e-5, atol=1e-3)
    assert isinstance(ours[1:3], dists.Independent) and ours[1:3].batch_shape == (2,)
