"""inference.py: refinement of q against the linear-Gaussian model's exact posterior, the gap decomposition's
ordering, gradient statistics, imputation against the closed-form conditional mean."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlvm_jax import distributions as dists
from dlvm_jax import inference as inf
from dlvm_jax.objectives import make_loss
from dlvm_jax.train import fit, init_state


@pytest.fixture(scope="module")
def trained_digits_vae(small_vae, small_vae_params, digits):
    """The small digits VAE after 100 epochs of the ELBO (about 2 s): a q worth refining, and an IS estimate
    whose proposal is reasonable (mean ESS ~900 of 2000)."""
    opt = optax.adam(3e-3)
    params = jax.tree.map(jnp.copy, small_vae_params)  # fit donates its state: keep the shared fixture alive
    state, _ = fit(init_state(params, opt, jax.random.key(5)), digits.x_train, loss_fn=make_loss(small_vae),
                   optimizer=opt, batch_size=100, epochs=100, progress=False)
    return state.params


def test_variational_params_round_trip(lg_model, lg_exact_params, small_vae, small_vae_params, digits):
    """Unconstrained coordinates reproduce the encoder's q exactly (full and diagonal Gaussians)."""
    x = digits.x_test[0]
    q = small_vae.encode(small_vae_params, x)
    q2 = inf.variational_dist(inf.variational_params(q))
    np.testing.assert_allclose(q2.loc, q.loc, rtol=1e-6)
    np.testing.assert_allclose(q2.scale_diag, q.scale_diag, rtol=1e-5)  # exp(log s): float32 rounding
    xl = jnp.ones(5)
    p = lg_model.encode(lg_exact_params, xl)
    p2 = inf.variational_dist(inf.variational_params(p))
    np.testing.assert_allclose(p2.scale_tri, p.scale_tri, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="diagonal or full-covariance Gaussian"):
        inf.variational_params(lg_model.decode(lg_exact_params, jnp.zeros(2)).distribution)


def test_refined_q_reaches_the_exact_posterior(lg_model, lg_params, lg_data, lg_exact_log_px):
    """Linear-Gaussian model, crude amortised q (gap ~9 nats): refining each point's full-covariance Gaussian from
    the encoder's output reaches p(z | x) (mean, covariance) and the approximation gap is 0 within 0.01 nats, both
    in closed form (KL(q* || p(z|x))) and by K = 1000 samples."""
    x = lg_data[:16]
    gaps, refinement = inf.decompose_gaps(lg_model, lg_params, x, jax.random.key(2), num_samples=1000,
                                          batch_size=16, progress=False, steps=200, learning_rate=0.05)
    chex.assert_shape(refinement.trace, (16, 200))
    chex.assert_shape(refinement.params["scale_tril"], (16, 2, 2))
    def loc_tri(d):
        return d.loc, d.scale_tri

    post_loc, post_tri = jax.vmap(lambda xi: loc_tri(inf.linear_gaussian_posterior(lg_model, lg_params, xi)))(x)
    q_loc, q_tri = jax.vmap(lambda v: loc_tri(inf.variational_dist(v)))(refinement.params)
    kl = jax.vmap(lambda v, xi: dists.kl_divergence(inf.variational_dist(v),
                                                    inf.linear_gaussian_posterior(lg_model, lg_params, xi)))(
        refinement.params, x)
    kl0 = jax.vmap(lambda xi: dists.kl_divergence(lg_model.encode(lg_params, xi),
                                                  inf.linear_gaussian_posterior(lg_model, lg_params, xi)))(x)
    assert float(jnp.min(kl0)) > 1.0  # the amortised q is far off: the test is not vacuous
    # Acceptance: approximation gap (= KL(q* || p(z|x)) here) 0 within 0.01 nats at every point (observed < 1e-4:
    # STL's gradient vanishes at the posterior, so the optimiser lands on it).
    np.testing.assert_array_less(np.asarray(kl), 0.01)
    np.testing.assert_allclose(q_loc, post_loc, atol=0.01)
    cov = lambda t: t @ jnp.swapaxes(t, -1, -2)  # noqa: E731
    np.testing.assert_allclose(cov(q_tri), cov(post_tri), atol=0.01)
    exact = np.asarray(lg_exact_log_px[:16], np.float64)
    # The estimates: with q* = p(z|x) every log-weight is log p(x), so ELBO(q*) and IS(q*) are exact to ~0.01.
    np.testing.assert_allclose(gaps.elbo_refined, exact, atol=0.01)
    np.testing.assert_allclose(gaps.log_px_refined_q, exact, atol=0.01)
    # The amortised ELBO sits the closed-form KL below log p(x) (K = 1000 samples: within 4 s.e. + 1e-3).
    err = np.abs(np.asarray(gaps.elbo_amortised) - (exact - np.asarray(kl0)))
    np.testing.assert_array_less(err, 4 * np.asarray(gaps.elbo_amortised_stderr) + 1e-3)
    s = gaps.summary()
    assert abs(s["approximation_gap"]) < 0.01
    assert s["amortisation_gap"] == pytest.approx(float(np.mean(kl0)), abs=0.1)
    # The ELBO trace starts at the amortised ELBO (noisy, 10 samples) and ends at log p(x).
    np.testing.assert_allclose(refinement.trace[:, -1], exact, atol=0.01)


def test_refined_elbo_between_amortised_elbo_and_log_px(small_vae, trained_digits_vae, digits):
    """Acceptance: on a trained VAE, at every point ELBO(q) <= ELBO(q*) <= IS log p(x) (K = 2000 samples from the
    amortised q), each within 3 standard errors (Monte-Carlo s.e. of both sides combined)."""
    x = digits.x_test[:16]
    gaps, refinement = inf.decompose_gaps(small_vae, trained_digits_vae, x, jax.random.key(1), num_samples=2000,
                                          batch_size=16, progress=False, steps=200, learning_rate=0.05)
    for field in gaps:
        chex.assert_shape(field, (16,))
    a, r, lp = (np.asarray(v, np.float64) for v in (gaps.elbo_amortised, gaps.elbo_refined, gaps.log_px))
    se_a, se_r, se_lp = (np.asarray(v, np.float64) for v in (gaps.elbo_amortised_stderr, gaps.elbo_refined_stderr,
                                                             gaps.log_px_stderr))
    assert np.all(r >= a - 3 * np.hypot(se_a, se_r)), (r - a) / np.hypot(se_a, se_r)
    assert np.all(r <= lp + 3 * np.hypot(se_r, se_lp)), (lp - r) / np.hypot(se_r, se_lp)
    s = gaps.summary()
    assert s["amortisation_gap"] > 0.05 and s["approximation_gap"] > 0.05  # both gaps are real here (~0.13 each)
    assert s["inference_gap"] == pytest.approx(s["approximation_gap"] + s["amortisation_gap"], abs=1e-4)
    # Jensen on the same samples: ELBO(q*) <= IS log p(x) with proposal q*.
    assert np.all(np.asarray(gaps.elbo_refined) <= np.asarray(gaps.log_px_refined_q) + 1e-4)
    # A diagonal Gaussian family stays diagonal.
    assert set(refinement.params) == {"loc", "log_scale"}


def test_refiner_bad_arguments(small_vae, assert_one_line):
    for kwargs, match in ((dict(estimator="score"), "unknown refinement estimator 'score'"),
                          (dict(steps=0), "steps .* must be an integer >= 1"),
                          (dict(learning_rate=0.0), "learning rates must be > 0")):
        with pytest.raises(ValueError, match=match) as err:
            inf.make_refiner(small_vae, **kwargs)
        assert_one_line(err.value)


def test_gradient_statistics_against_numpy():
    """The chunked, merged mean and variance equal numpy's over the same 300 gradients (chunks of 40 do not divide
    300: the chunk shrinks to 30)."""
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}

    def loss_fn(p, batch, key, step):  # gradient = batch * (2 + noise): mean 2 batch, variance batch^2 (per entry)
        ka, kb = jax.random.split(key)
        noise = {"a": jax.random.normal(ka, (3,)), "b": jax.random.normal(kb, (2, 2))}
        return sum(jnp.sum(p[k] * batch * (2.0 + noise[k])) for k in p), {}

    batch = jnp.asarray(1.5)
    stats = inf.gradient_statistics(loss_fn, params, batch, jax.random.key(0), num_keys=300, chunk=40)
    grads = jax.vmap(jax.grad(lambda p, k: loss_fn(p, batch, k, 0)[0]), in_axes=(None, 0))(
        params, jax.random.split(jax.random.key(0), 300))
    for k in params:
        g = np.asarray(grads[k], np.float64)
        np.testing.assert_allclose(stats.mean[k], g.mean(0), rtol=1e-5)
        np.testing.assert_allclose(stats.variance[k], g.var(0, ddof=1), rtol=1e-4)
    assert stats.num_keys == 300
    all_var = np.concatenate([np.asarray(grads[k], np.float64).var(0, ddof=1).ravel() for k in ("a", "b")])
    assert stats.mean_variance() == pytest.approx(all_var.mean(), rel=1e-4)
    assert stats.mean_variance("a") == pytest.approx(np.asarray(grads["a"]).var(0, ddof=1).mean(), rel=1e-4)
    assert stats.mean_variance() == pytest.approx(1.5**2, rel=0.2)  # 7 entries x 300 draws of variance 2.25


def test_stl_variance_falls_to_zero_as_q_approaches_the_posterior(lg_model, lg_params, lg_exact_params, lg_data):
    """Roeder et al. 2017: on the path from the crude encoder to the exact one, the variance of STL's encoder
    gradient falls and is 0 at the posterior (up to float32 rounding), while the reparameterisation gradient's
    variance stays bounded away from 0 (its score term has variance even at the optimum)."""
    x = lg_data[:8]
    stats = {e: inf.make_gradient_statistics(make_loss(lg_model, num_samples=4, estimator=e, analytic_kl=False),
                                             num_keys=200) for e in ("stl", "reparam")}
    var = {e: [] for e in stats}
    for t in (0.0, 0.5, 0.9, 1.0):
        enc = jax.tree.map(lambda a, b, t=t: (1 - t) * a + t * b, lg_params["encoder"], lg_exact_params["encoder"])
        params = {"generative": lg_params["generative"], "encoder": enc}
        for e, fn in stats.items():
            var[e].append(fn(params, x, jax.random.key(3)).mean_variance("encoder"))
    stl, rep = np.array(var["stl"]), np.array(var["reparam"])
    assert np.all(np.diff(stl) < 0), stl
    assert stl[-1] < 1e-8 * stl[0], stl
    assert rep[-1] > 0.01 * rep[0], rep


# ------------------------------------------------------------------------------------------------------------
# Imputation
# ------------------------------------------------------------------------------------------------------------


def test_elementwise_log_prob_sums_to_log_prob(lg_model, lg_params, small_vae, small_vae_params, digits):
    z = jax.random.normal(jax.random.key(0), (3, 2))
    d = lg_model.decode(lg_params, z)
    x = jnp.arange(5.0)
    np.testing.assert_allclose(jnp.sum(inf.elementwise_log_prob(d, x), -1), d.log_prob(x), rtol=1e-5)
    d = small_vae.decode(small_vae_params, jax.random.normal(jax.random.key(1), (3, 4)))
    x = jnp.asarray(digits.x_test[0] > 0.5, jnp.float32)
    np.testing.assert_allclose(jnp.sum(inf.elementwise_log_prob(d, x), -1), d.log_prob(x), rtol=1e-5)
    mask = jnp.arange(64) < 20
    np.testing.assert_allclose(inf.observed_log_prob(d, x, mask),
                               jnp.sum(inf.elementwise_log_prob(d, x)[:, :20], -1), rtol=1e-5)


def test_linear_gaussian_conditional_mean_against_numpy(lg_model, lg_params, lg_data):
    cov = np.asarray(lg_model.marginal_covariance(lg_params), np.float64)
    b = np.asarray(lg_params["generative"]["b"], np.float64)
    x = np.asarray(lg_data[0], np.float64)
    observed = np.array([True, False, True, True, False])
    o, m = np.nonzero(observed)[0], np.nonzero(~observed)[0]
    ref = x.copy()
    ref[m] = b[m] + cov[np.ix_(m, o)] @ np.linalg.solve(cov[np.ix_(o, o)], x[o] - b[o])
    ours = inf.linear_gaussian_conditional_mean(lg_model, lg_params, jnp.asarray(x, jnp.float32), observed)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, options", [
    ("importance", dict(num_samples=20000, num_draws=4)),
    ("mwg", dict(steps=1000, burn_in=100, num_draws=4)),
])
def test_imputation_converges_to_the_conditional_mean(lg_model, lg_params, lg_data, method, options):
    """Linear-Gaussian model with entries 1 and 4 unobserved: each method's single imputation approaches the
    closed-form E[x_m | x_o] (the encoder sees zeros in the missing entries, so q is a poor proposal and the
    weights / acceptance do the work). Observed entries are returned bit for bit."""
    observed = jnp.array([True, False, True, True, False])
    x = lg_data[:6]
    exact = jax.vmap(lambda xi: inf.linear_gaussian_conditional_mean(lg_model, lg_params, xi, observed))(x)
    impute = inf.make_imputer(lg_model, method, **options)
    # 16 independent runs per point (repeated rows): their spread gives the Monte-Carlo standard error.
    reps = 16
    out = impute(lg_params, jnp.repeat(x, reps, axis=0), observed, jax.random.key(7))
    chex.assert_shape(out.mean, (6 * reps, 5))
    chex.assert_shape(out.draws, (6 * reps, 4, 5))
    np.testing.assert_array_equal(np.asarray(out.mean)[:, observed], np.repeat(np.asarray(x), reps, 0)[:, observed])
    np.testing.assert_array_equal(np.asarray(out.draws)[:, :, observed],
                                  np.repeat(np.asarray(x), reps, 0)[:, None, observed].repeat(4, 1))
    means = np.asarray(out.mean, np.float64).reshape(6, reps, 5)[:, :, ~np.asarray(observed)]
    est, se = means.mean(1), means.std(1, ddof=1) / math.sqrt(reps)
    truth = np.asarray(exact, np.float64)[:, ~np.asarray(observed)]
    # Statistical: within 4 standard errors of the 16 runs, plus 0.01 for the self-normalised estimator's O(1/K)
    # bias and the chain's burn-in (the conditional standard deviations are ~0.5-1).
    np.testing.assert_array_less(np.abs(est - truth), 4 * se + 0.01)
    # The draws scatter around the conditional mean (not all equal to it).
    assert float(np.std(np.asarray(out.draws)[:, :, ~np.asarray(observed)])) > 0.1
    diag = np.asarray(out.diagnostic)
    if method == "importance":
        assert np.all((diag >= 1) & (diag <= options["num_samples"]))  # ESS
    else:
        assert np.all((diag > 0) & (diag <= 1))  # acceptance rate


@pytest.mark.parametrize("method, options", [
    ("importance", dict(num_samples=200, num_draws=3)),
    ("mwg", dict(steps=30, burn_in=10, num_draws=3)),
])
def test_imputation_keeps_observed_pixels(small_vae, small_vae_params, digits, method, options):
    """Acceptance: binary images with the top half unobserved (per-row masks here): observed pixels come back
    unchanged, missing ones hold probabilities (single imputation) or binary draws."""
    x = jnp.asarray(digits.x_test[:5] > 0.5, jnp.float32)
    observed = jnp.broadcast_to(jnp.arange(64) >= 32, x.shape)
    out = inf.make_imputer(small_vae, method, fill=0.5, **options)(small_vae_params, x, observed, jax.random.key(0))
    obs = np.asarray(observed)
    np.testing.assert_array_equal(np.asarray(out.mean)[obs], np.asarray(x)[obs])
    for d in range(3):
        np.testing.assert_array_equal(np.asarray(out.draws)[:, d][obs], np.asarray(x)[obs])
    missing = np.asarray(out.mean)[~obs]
    assert np.all((missing > 0) & (missing < 1))
    assert set(np.unique(np.asarray(out.draws)[:, 0][~obs])) <= {0.0, 1.0}
    base = inf.mean_imputation(x, observed, jnp.full(64, 0.25))
    np.testing.assert_array_equal(np.asarray(base)[obs], np.asarray(x)[obs])
    assert np.all(np.asarray(base)[~obs] == 0.25)


def test_imputation_bad_arguments(small_vae, assert_one_line):
    with pytest.raises(ValueError, match="unknown imputation method 'gibbs'") as err:
        inf.make_imputer(small_vae, "gibbs")
    assert_one_line(err.value)
    with pytest.raises(ValueError, match=r"burn_in must be in \[0, steps\)") as err:
        inf.impute_mwg(small_vae, None, jnp.zeros(64), jnp.ones(64, bool), jax.random.key(0), steps=5, burn_in=5)
    assert_one_line(err.value)


# ------------------------------------------------------------------------------------------------------------
# The experiment scripts, end to end on tiny settings (slow: each compiles its own functions; needs the data)
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_diagnostics_scripts_tiny_run(tmp_path, monkeypatch):
    import importlib
    import json
    import os
    import sys
    from pathlib import Path

    from dlvm_jax import data

    root = os.environ.get(data.DATA_DIR_ENV)
    if not root:
        pytest.skip(f"{data.DATA_DIR_ENV} is not set: no MNIST for the diagnostics scripts")
    experiments = Path(__file__).resolve().parents[1] / "experiments"
    monkeypatch.syspath_prepend(str(experiments))
    for name in ("diagnostics_vae", "diagnostics_gaps", "diagnostics_estimators", "diagnostics_sampling",
                 "diagnostics_imputation"):
        sys.modules.pop(name, None)
    mods = {n: importlib.import_module(f"diagnostics_{n}") for n in ("vae", "gaps", "estimators", "sampling",
                                                                       "imputation")}
    common = ["--data-dir", root, "--params", str(tmp_path / "v.msgpack"), "--record", str(tmp_path / "v.json"),
              "--no-progress"]
    assert mods["vae"].main(["--data-dir", root, "--epochs", "1", "--max-train", "200", "--params",
                             str(tmp_path / "v.msgpack"), "--out", str(tmp_path / "v.json"), "--no-progress"]) == 0
    assert mods["gaps"].main(common + ["--num-test", "4", "--is-samples", "20", "--steps", "5", "--lg-points", "5",
                                       "--lg-steps", "5", "--out", str(tmp_path / "g.json")]) == 0
    g = json.loads((tmp_path / "g.json").read_text())
    assert g["summary"]["num_examples"] == 4 and g["reference"]["log_px"] == -89.80
    assert g["checks"]["images_with_refined_below_amortised_by_3se"] >= 0 and "linear_gaussian" in g
    assert mods["estimators"].main(common + ["--num-keys", "4", "--lg-epochs", "1", "--var-batch", "2",
                                             "--train-epochs", "0", "--out", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["linear_gaussian"]["path"][-1]["stl"]["encoder"] < 1e-8  # STL at the exact posterior
    assert set(e["mnist"]["variance"]) == {"reparam", "reparam_mc", "stl", "score"}
    assert mods["sampling"].main(common + ["--max-k", "100", "--repeats", "1", "--lg-points", "3", "--lg-repeats",
                                           "2", "--mnist-images", "2", "--chunk", "50",
                                           "--out", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert [r["k"] for r in s["linear_gaussian"]["by_k"]["q"]] == [1, 10, 100]
    assert mods["imputation"].main(common + ["--num-images", "3", "--is-samples", "10", "--mwg-steps", "6",
                                             "--burn-in", "2", "--figure-images", "3",
                                             "--out", str(tmp_path / "i.json")]) == 0
    i = json.loads((tmp_path / "i.json").read_text())
    assert all(i["observed_pixels_unchanged"].values())
    for stem in ("g", "e", "s", "i"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
