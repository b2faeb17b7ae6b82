"""objectives.py: ELBO and IWAE identities, monotonicity of the IWAE bound in K, STL, KL warm-up, make_loss."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlvm_jax import distributions as dists
from dlvm_jax import objectives
from dlvm_jax.likelihood import log_likelihood


def _per_example(fn, x, key):
    """vmap ``fn(x_i, key_i)`` over a batch with one key per example (as make_loss does)."""
    return jax.vmap(fn)(x, jax.random.split(key, x.shape[0]))


@pytest.mark.parametrize("which", ["vae", "linear_gaussian"])
def test_iwae_k1_equals_mc_elbo(which, small_vae, small_vae_params, digits, lg_model, lg_params, lg_data):
    """IWAE with K = 1 is log w_1 = log p(x|z) + log p(z) - log q(z|x): the single-sample Monte-Carlo ELBO on
    the same key (the same z)."""
    if which == "vae":
        model, params, x = small_vae, small_vae_params, jnp.asarray(digits.x_test[:16])
    else:
        model, params, x = lg_model, lg_params, lg_data[:16]

    @jax.jit
    def both(params, x, key):
        iw = _per_example(lambda xi, k: objectives.iwae(model, params, xi, k, num_samples=1), x, key)
        el = _per_example(lambda xi, k: objectives.elbo(model, params, xi, k, num_samples=1, analytic_kl=False),
                          x, key)
        return iw, el

    iw, el = both(params, x, jax.random.key(1))
    chex.assert_shape((iw, el), (16,))
    # An identity up to float32 rounding: the two sum the same three terms in a different order; values are
    # O(10-50), so rtol 1e-6 is ~8 ulps (observed 1.3e-7).
    np.testing.assert_allclose(iw, el, rtol=1e-6, atol=1e-6)
    # Different z (another key) gives a different value, so the identity is not vacuous.
    iw2, _ = both(params, x, jax.random.key(2))
    assert np.abs(np.asarray(iw2) - np.asarray(iw)).max() > 1e-2


def test_iwae_k1_loss_equals_mc_elbo_loss(small_vae, small_vae_params, digits):
    """The same identity at the level of make_loss (the same batch noise for both losses)."""
    x = jnp.asarray(digits.x_test[:32])
    iwae_loss = objectives.make_loss(small_vae, objective="iwae", num_samples=1)
    elbo_loss = objectives.make_loss(small_vae, objective="elbo", num_samples=1, analytic_kl=False)
    li, mi = jax.jit(iwae_loss)(small_vae_params, x, jax.random.key(0), 0)
    le, me = jax.jit(elbo_loss)(small_vae_params, x, jax.random.key(0), 0)
    np.testing.assert_allclose(li, le, rtol=1e-6)
    np.testing.assert_allclose(mi["iwae"], -li, rtol=1e-6)
    np.testing.assert_allclose(me["elbo"], me["rec"] - me["kl"], rtol=1e-6)


def test_iwae_bound_increases_with_k_and_stays_below_log_px(small_vae, small_vae_params, digits):
    """E[IWAE_K] is non-decreasing in K and bounded by log p(x) (Burda et al. 2015, Theorem 1). The mean over 50
    keys (and 20 test digits) of the K = 1, 10, 100 bounds increases and stays below the K = 5000 IS estimate.
    Untrained small VAE: its q is poor, so the gaps are large (about 1.0, 0.3 and 0.2 nats)."""
    model, params = small_vae, small_vae_params
    x = jnp.asarray(digits.x_test[:20])
    keys = jax.random.split(jax.random.key(2), 50)
    means, ses = {}, {}
    for k in (1, 10, 100):
        bound = jax.jit(jax.vmap(lambda key, k=k: jnp.mean(
            _per_example(lambda xi, ki: objectives.iwae(model, params, xi, ki, num_samples=k), x, key))))
        per_key = np.asarray(bound(keys), np.float64)  # (50,): the batch-mean bound for each key
        chex.assert_shape(per_key, (50,))
        means[k], ses[k] = per_key.mean(), per_key.std(ddof=1) / math.sqrt(50)
    est = log_likelihood(model, params, x, jax.random.key(3), num_samples=5000, chunk_size=1000, progress=False)
    is_5000 = float(np.mean(est.log_px))
    # Each increase is required to exceed 3 standard errors of the two means combined, so the ordering is
    # resolved by the 50 keys, not an accident of noise.
    for lo, hi in ((1, 10), (10, 100)):
        assert means[hi] - means[lo] > 3 * math.hypot(ses[lo], ses[hi]), (means, ses)
    se_is = est.summary()["log_px_mc_se"]
    assert means[100] < is_5000 - 3 * math.hypot(ses[100], se_is), (means[100], is_5000, ses[100], se_is)


def test_analytic_and_monte_carlo_kl_elbo_agree(small_vae, small_vae_params, digits):
    """Both ELBO forms share the reconstruction term on the same key; their KL terms agree in expectation."""
    model, params = small_vae, small_vae_params
    x = jnp.asarray(digits.x_test[:8])

    @jax.jit
    def terms(key):
        a = _per_example(lambda xi, k: objectives.elbo_terms(model, params, xi, k, num_samples=4), x, key)
        m = _per_example(lambda xi, k: objectives.elbo_terms(model, params, xi, k, num_samples=4,
                                                             analytic_kl=False), x, key)
        return a, m

    keys = jax.random.split(jax.random.key(0), 500)
    a, m = jax.vmap(terms)(keys)
    chex.assert_shape((a["kl"], m["kl"], a["rec"]), (500, 8))
    np.testing.assert_array_equal(a["rec"], m["rec"])  # the same z
    kl_mc = np.asarray(m["kl"], np.float64)
    mean, se = kl_mc.mean(0), kl_mc.std(0, ddof=1) / math.sqrt(kl_mc.shape[0])
    # Statistical: each example's MC KL within 4 standard errors of the analytic KL (8 examples).
    np.testing.assert_array_less(np.abs(mean - np.asarray(a["kl"][0], np.float64)), 4 * se)
    np.testing.assert_allclose(a["kl"][0], a["kl"][1], rtol=1e-6)  # the analytic KL does not depend on the key


def test_mc_elbo_is_mean_log_weight_and_iwae_is_logmeanexp(lg_model, lg_params, lg_data):
    x, key, k = lg_data[0], jax.random.key(4), 64

    @jax.jit
    def f(params):
        log_w = lg_model.log_weights(params, x, key, k)
        return (log_w, objectives.elbo(lg_model, params, x, key, num_samples=k, analytic_kl=False),
                objectives.iwae(lg_model, params, x, key, num_samples=k))

    log_w, el, iw = f(lg_params)
    chex.assert_shape(log_w, (k,))
    lw = np.asarray(log_w, np.float64)
    # Identities on the same samples (float32, values ~10): 1e-5 absolute.
    assert float(el) == pytest.approx(lw.mean(), abs=1e-5)
    assert float(iw) == pytest.approx(np.log(np.mean(np.exp(lw - lw.max()))) + lw.max(), abs=1e-5)
    assert float(el) < float(iw)


def test_sticking_the_landing_has_zero_gradient_at_the_exact_posterior(lg_model, lg_exact_params, lg_data):
    """With q = p(z|x) every log-weight is log p(x) whatever z, so the STL (path-only) gradient w.r.t. the encoder
    is exactly zero, while the reparameterised gradient still carries the zero-mean score term (Roeder et al.
    2017). The objective values are the same for both estimators."""
    x = lg_data[:16]
    results = {}
    for objective, analytic_kl in (("iwae", True), ("elbo", False)):
        for estimator in ("reparam", "stl"):
            loss_fn = objectives.make_loss(lg_model, objective=objective, num_samples=10, analytic_kl=analytic_kl,
                                           estimator=estimator)
            (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
                lg_exact_params, x, jax.random.key(2), 0)
            enc = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["encoder"]))
            results[objective, estimator] = (float(loss), enc)
    for objective in ("iwae", "elbo"):
        (l_rep, g_rep), (l_stl, g_stl) = results[objective, "reparam"], results[objective, "stl"]
        assert l_rep == pytest.approx(l_stl, rel=1e-6)
        # float32 gradients of log-weights of magnitude ~10: rounding ~1e-6 (observed 3e-6), against 0.1-0.5.
        assert g_stl < 1e-4, (objective, g_stl)
        assert g_rep > 1e-2, (objective, g_rep)


def test_three_estimators_agree_in_expectation_with_the_exact_gradient(lg_model, lg_params, lg_data):
    """Acceptance: on the linear-Gaussian model the ELBO of a Gaussian q is log p(x) - KL(q || p(z|x)) in closed form,
    so its gradient in every parameter (encoder and generative) is known. The mean over 1,000 keys of each
    estimator's gradient (reparameterisation with the analytic and the Monte-Carlo KL, sticking the landing, score
    function with a leave-one-out baseline; M = 4 samples, 8 points) lies within 4 standard errors of it, entry
    by entry (36 entries; the one above L's diagonal is unused, its gradient exactly 0, hence the 1e-6)."""
    from dlvm_jax import inference

    x = lg_data[:8]
    exact = jax.jit(jax.grad(lambda p: -jnp.mean(jax.vmap(lambda xi: inference.linear_gaussian_elbo(lg_model, p, xi))(
        x))))(lg_params)
    variances = {}
    for name, kwargs in (("reparam", dict(estimator="reparam")),
                         ("reparam_mc_kl", dict(estimator="reparam", analytic_kl=False)),
                         ("stl", dict(estimator="stl")), ("score", dict(estimator="score"))):
        loss_fn = objectives.make_loss(lg_model, num_samples=4, **kwargs)
        stats = inference.gradient_statistics(loss_fn, lg_params, x, jax.random.key(3), num_keys=1000, chunk=100)
        for path, mean, var, true in zip(jax.tree_util.tree_leaves_with_path(stats.mean),
                                         jax.tree.leaves(stats.mean), jax.tree.leaves(stats.variance),
                                         jax.tree.leaves(exact)):
            mean, var, true = (np.asarray(a, np.float64) for a in (mean, var, true))
            se = np.sqrt(var / 1000)
            np.testing.assert_array_less(np.abs(mean - true), 4 * se + 1e-6,
                                         err_msg=f"{name} {jax.tree_util.keystr(path[0])}")
        variances[name] = stats.mean_variance("encoder")
    # The three estimators differ in variance, not in mean: STL has the least here and the score function the most
    # (observed about 12, 14 and 78 for STL, reparameterisation with the MC KL, score function).
    assert variances["stl"] < variances["reparam_mc_kl"] < variances["score"]


def test_score_function_surrogate_value_and_decoder_gradient(lg_model, lg_params, lg_data):
    """The score-function loss has the Monte-Carlo ELBO's value on the same samples, and the same decoder
    (generative) gradient as the reparameterised MC ELBO (both are the mean of grad log p(x, z_m) at the same z)."""
    x = lg_data[:16]
    out = {}
    for estimator in ("reparam", "score"):
        loss_fn = objectives.make_loss(lg_model, num_samples=5, analytic_kl=False, estimator=estimator)
        out[estimator] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(lg_params, x, jax.random.key(0), 0)
    (l_r, m_r), g_r = out["reparam"]
    (l_s, m_s), g_s = out["score"]
    assert float(l_s) == pytest.approx(float(l_r), rel=1e-6)
    for k in ("elbo", "rec", "kl"):
        assert float(m_s[k]) == pytest.approx(float(m_r[k]), rel=1e-5, abs=1e-5)
    for a, b in zip(jax.tree.leaves(g_s["generative"]), jax.tree.leaves(g_r["generative"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # ... but a different encoder gradient (score term instead of the path).
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g_s["encoder"]),
                                                                jax.tree.leaves(g_r["encoder"])))
    assert diff > 0.1


def test_kl_weight_warmup():
    assert float(objectives.kl_weight(jnp.asarray(5), beta=0.5)) == 0.5
    steps = jnp.array([0, 25, 100, 1000])
    np.testing.assert_allclose(objectives.kl_weight(steps, beta=2.0, warmup_steps=100), [0.0, 0.5, 2.0, 2.0])


def test_make_loss_beta_and_warmup(small_vae, small_vae_params, digits):
    """loss = -(rec - weight * kl), weight = beta * min(1, step / warmup)."""
    x = jnp.asarray(digits.x_test[:16])
    loss_fn = jax.jit(objectives.make_loss(small_vae, beta=2.0, warmup_steps=10))
    for step, weight in ((0, 0.0), (5, 1.0), (20, 2.0)):
        loss, metrics = loss_fn(small_vae_params, x, jax.random.key(0), step)
        assert set(metrics) == {"elbo", "rec", "kl", "loss", "beta"}
        assert float(metrics["beta"]) == pytest.approx(weight)
        # The metrics are batch means of per-example terms, the loss a linear combination of them.
        assert float(loss) == pytest.approx(-(float(metrics["rec"]) - weight * float(metrics["kl"])), rel=1e-5)
        assert float(metrics["elbo"]) == pytest.approx(float(metrics["rec"]) - float(metrics["kl"]), rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=0), r"num_samples \(the number of Monte Carlo / importance samples K\) must be an integer >= 1"
                          r", got 0"),
    (dict(objective="iwae", num_samples=-1), r"must be an integer >= 1, got -1"),
    (dict(objective="vimco"), r"unknown objective 'vimco'; choose one of elbo, iwae"),
    (dict(estimator="reinforce"), r"unknown gradient estimator 'reinforce'; choose one of reparam, stl, score"),
    (dict(estimator="score"), r"leave-one-out baseline needs num_samples >= 2, got 1"),
    (dict(estimator="score", objective="iwae", num_samples=5), r"score-function estimator is implemented for "
                                                               r"objective='elbo'"),
    (dict(beta=-1.0), r"the KL weight beta must be >= 0, got -1.0"),
])
def test_make_loss_bad_arguments(small_vae, kwargs, match, assert_one_line):
    with pytest.raises(ValueError, match=match) as err:
        objectives.make_loss(small_vae, **kwargs)
    assert_one_line(err.value)


def test_make_loss_hands_each_example_its_slice_of_the_batch_noise(small_vae, small_vae_params, digits, lg_model,
                                                                  lg_params, lg_data):
    """make_loss draws normal(key, (B, M, D)) once; the per-example functions given a noise array in place of a
    key reproduce its values, and a wrong noise shape or a non-Gaussian q is refused."""
    x = jnp.asarray(digits.x_test[:8])
    key = jax.random.key(3)
    for objective, m in (("elbo", 3), ("iwae", 4)):
        loss, metrics = objectives.make_loss(small_vae, objective=objective, num_samples=m)(small_vae_params, x, key, 0)
        noise = jax.random.normal(key, (8, m, small_vae.config.latent_dim))
        fn = objectives.iwae if objective == "iwae" else objectives.elbo
        per_example = jax.vmap(lambda xi, e: fn(small_vae, small_vae_params, xi, e, num_samples=m))(x, noise)
        np.testing.assert_allclose(loss, -np.mean(per_example), rtol=1e-6)
    # the noise path is the reparameterisation z = loc + scale eps (diagonal) / loc + eps L^T (full covariance)
    q = small_vae.encode(small_vae_params, x[0])
    eps = jax.random.normal(jax.random.key(0), (5, small_vae.config.latent_dim))
    np.testing.assert_allclose(dists.sample(q, eps, 5), q.loc + q.scale_diag * eps, rtol=1e-6)
    q_lg = lg_model.encode(lg_params, lg_data[0])
    eps = jax.random.normal(jax.random.key(0), (100_000,) + q_lg.event_shape)
    z = np.asarray(dists.sample(q_lg, eps, 100_000), np.float64)
    cov = np.asarray(q_lg.scale_tri @ q_lg.scale_tri.T, np.float64)
    np.testing.assert_allclose(np.cov(z.T), cov, atol=0.03 * np.abs(cov).max())
    with pytest.raises(ValueError, match="must have shape"):
        dists.sample(q, eps[:3, :2], 3)
    with pytest.raises(TypeError, match="needs a Gaussian q"):
        dists.sample(dists.likelihood_dist("bernoulli", jnp.zeros(4), (4,)), jnp.zeros((2, 4)), 2)


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_one_sample_elbo_equals_the_general_path_on_a_repeated_sample(small_vae, small_vae_params, digits,
                                                                      analytic_kl):
    """With one sample the ELBO decodes z without its sample axis (elbo_terms); the result must equal the M-sample
    path's mean over M=2 copies of that same sample, value and gradient."""
    x = jnp.asarray(digits.x_test[:6])
    eps = jax.random.normal(jax.random.key(5), (6, 1, small_vae.config.latent_dim))

    def loss(params, noise, m):
        terms = jax.vmap(lambda xi, e: objectives.elbo_terms(small_vae, params, xi, e, num_samples=m,
                                                             analytic_kl=analytic_kl))(x, noise)
        return jnp.mean(terms["elbo"]), terms

    (one, terms1), g1 = jax.value_and_grad(loss, has_aux=True)(small_vae_params, eps, 1)
    (two, terms2), g2 = jax.value_and_grad(loss, has_aux=True)(small_vae_params, jnp.concatenate([eps, eps], 1), 2)
    assert terms1["rec"].shape == (6,)
    np.testing.assert_allclose(one, two, rtol=1e-6)
    for k in ("rec", "kl"):
        np.testing.assert_allclose(terms1[k], terms2[k], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-6)
