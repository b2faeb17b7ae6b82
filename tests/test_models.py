"""models/: the linear-Gaussian model's closed forms, the VAE's shape contracts and configuration errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from dlvm_jax import networks
from dlvm_jax.models import VAE, LinearGaussian, LinearGaussianConfig, VAEConfig

# ----------------------------------------------------------------------------------------------------------
# Linear-Gaussian model: the ground truth the estimators are tested against
# ----------------------------------------------------------------------------------------------------------


def _np_gen(params):
    g = jax.device_get(params["generative"])
    return (np.asarray(g["W"], np.float64), np.asarray(g["b"], np.float64),
            np.exp(np.asarray(g["log_psi"], np.float64)))


def test_exact_log_prob_matches_scipy(lg_params, lg_data, lg_exact_log_px):
    w, b, psi = _np_gen(lg_params)
    ref = scipy.stats.multivariate_normal(b, w @ w.T + np.diag(psi)).logpdf(np.asarray(lg_data, np.float64))
    # float32 Cholesky of a well-conditioned 5x5 covariance; log-densities ~ -10: 1e-4 absolute.
    np.testing.assert_allclose(lg_exact_log_px, ref, rtol=0, atol=1e-4)


def test_exact_encoder_is_the_posterior(lg_model, lg_exact_params, lg_data):
    """q*(z|x) has the mean and covariance of p(z|x) (float64 numpy), and Bayes' rule holds pointwise:
    log p(x|z) + log p(z) - log q*(z|x) = log p(x) for ANY z, not only for z drawn from q."""
    w, b, psi = _np_gen(lg_exact_params)
    cov = np.linalg.inv(np.eye(2) + w.T @ np.diag(1 / psi) @ w)
    x = np.asarray(lg_data[:5], np.float64)
    mean = (cov @ w.T @ np.diag(1 / psi) @ (x - b).T).T

    @jax.jit
    def moments_and_bayes(params, x, z):
        q_mean = jax.vmap(lambda xi: lg_model.encode(params, xi).mean())(x)
        q_cov = jax.vmap(lambda xi: lg_model.encode(params, xi).covariance())(x)
        def log_joint_minus_log_q(xi, zi):
            return (lg_model.decode(params, zi).log_prob(xi) + lg_model.prior(params).log_prob(zi)
                    - lg_model.encode(params, xi).log_prob(zi))

        log_joint = jax.vmap(log_joint_minus_log_q)(x, z)
        return q_mean, q_cov, log_joint, jax.vmap(lambda xi: lg_model.exact_log_prob(params, xi))(x)

    z = 2.0 * np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)  # far from the posterior, too
    q_mean, q_cov, log_joint, exact = moments_and_bayes(lg_exact_params, jnp.asarray(x, jnp.float32), z)
    chex.assert_shape(q_mean, (5, 2))
    chex.assert_shape(q_cov, (5, 2, 2))
    # float32 inverse/Cholesky of 2x2 matrices: 1e-5 relative and absolute.
    np.testing.assert_allclose(q_mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q_cov, np.broadcast_to(cov, (5, 2, 2)), rtol=1e-5, atol=1e-5)
    # Log-densities of magnitude up to ~20 at z far in the tails: 1e-4 absolute.
    np.testing.assert_allclose(log_joint, exact, rtol=0, atol=1e-4)


def test_default_encoder_is_misspecified(lg_model, lg_params, lg_exact_params, lg_data):
    """The default init gives a q visibly different from the posterior (the estimators have something to fix)."""
    kl = jax.jit(jax.vmap(lambda x: lg_model.encode(lg_params, x).kl_divergence(lg_model.encode(lg_exact_params, x))))(
        lg_data[:10])
    assert np.all(np.asarray(kl) > 0.5), kl


def test_sample_data_matches_marginal(lg_model, lg_params):
    n = 20_000
    x = np.asarray(jax.jit(lg_model.sample_data, static_argnums=2)(lg_params, jax.random.key(9), n), np.float64)
    chex.assert_shape(x, (n, 5))
    _, b, _ = _np_gen(lg_params)
    cov = np.asarray(jax.jit(lg_model.marginal_covariance)(lg_params), np.float64)
    # Statistical: sample mean within 4 standard errors per coordinate; the sample covariance within 4 standard
    # errors of each entry (sd of a sample covariance entry = sqrt((S_ii S_jj + S_ij^2) / n)).
    np.testing.assert_array_less(np.abs(x.mean(0) - b), 4 * np.sqrt(np.diag(cov) / n))
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 4 * se_cov)


def test_linear_gaussian_shapes(lg_model, lg_params, lg_data):
    k, b, d = 7, 3, lg_model.config.latent_dim

    @jax.jit
    def shapes(params, x, key):
        keys = jax.random.split(key, x.shape[0])
        return (lg_model.log_weights(params, x[0], key, k),
                jax.vmap(lambda xi, ki: lg_model.log_weights(params, xi, ki, k))(x, keys),
                lg_model.encode(params, x[0]).sample(seed=key))

    lw, lw_batch, z = shapes(lg_params, lg_data[:b], jax.random.key(0))
    chex.assert_shape(lw, (k,))
    chex.assert_shape(lw_batch, (b, k))
    chex.assert_shape(z, (d,))
    assert lg_model.encode(lg_params, lg_data[0]).event_shape == (d,)
    assert LinearGaussian(LinearGaussianConfig()) == lg_model and hash(LinearGaussian(LinearGaussianConfig())) == hash(
        lg_model)


# ----------------------------------------------------------------------------------------------------------
# VAE: shape contracts where samples (K), batch (B), latents (D) and data meet
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    VAEConfig(data_shape=(64,), latent_dim=3, hidden=(16,), likelihood="bernoulli"),
    VAEConfig(data_shape=(4, 4), latent_dim=2, hidden=(8, 8), likelihood="gaussian", activation="relu",
              layer_norm=True),
    VAEConfig(data_shape=(10,), latent_dim=5, hidden=(8,), likelihood="continuous_bernoulli"),
    VAEConfig(data_shape=(28, 28, 1), latent_dim=3, likelihood="gaussian", network="conv"),
], ids=["mlp-bernoulli", "mlp-gaussian-2d", "mlp-cb", "conv-gaussian"])
def test_vae_shape_contracts(config):
    model = VAE(config)
    k, b, d = 5, 3, config.latent_dim
    params = jax.jit(model.init)(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(b,) + config.data_shape), jnp.float32)
    info = {}

    @jax.jit
    def run(params, x, key):
        keys = jax.random.split(key, b)
        q = model.encode(params, x[0])
        z = q.sample(seed=key, sample_shape=k)
        px = model.decode(params, z)
        info.update(q_event=q.event_shape, q_batch=q.batch_shape, px_event=px.event_shape, px_batch=px.batch_shape)
        return {
            "z": z,
            "px_log_prob": px.log_prob(x[0]),
            "log_w": model.log_weights(params, x[0], key, k),
            "log_w_batch": jax.vmap(lambda xi, ki: model.log_weights(params, xi, ki, k))(x, keys),
            "q_batch_mean": jax.vmap(lambda xi: model.encode(params, xi).mean())(x),
            "samples": model.sample(params, key, 4),
            "recon": model.reconstruct(params, x[0]),
        }

    out = run(params, x, jax.random.key(1))
    assert info["q_event"] == (d,) and info["q_batch"] == ()
    assert info["px_event"] == config.data_shape and info["px_batch"] == (k,)
    chex.assert_shape(out["z"], (k, d))
    chex.assert_shape(out["px_log_prob"], (k,))
    chex.assert_shape(out["log_w"], (k,))
    chex.assert_shape(out["log_w_batch"], (b, k))
    chex.assert_shape(out["q_batch_mean"], (b, d))
    chex.assert_shape(out["samples"], (4,) + config.data_shape)
    chex.assert_shape(out["recon"], config.data_shape)
    chex.assert_tree_all_finite(out)
    if config.likelihood != "gaussian":
        assert np.all((np.asarray(out["samples"]) >= 0) & (np.asarray(out["samples"]) <= 1))


def test_vae_init_sets_decoder_bias_to_data_logit(small_vae, small_vae_params, digits):
    mean = np.clip(digits.x_train.mean(0), 1e-3, 1 - 1e-3)
    dec = small_vae_params["decoder"]
    last = sorted(k for k in dec if k.startswith("Dense_"))[-1]
    np.testing.assert_allclose(dec[last]["bias"], np.log(mean) - np.log1p(-mean), rtol=1e-5, atol=1e-5)
    assert VAE(small_vae.config) == small_vae and hash(VAE(small_vae.config)) == hash(small_vae)


@pytest.mark.parametrize("kwargs, match", [
    (dict(network="conv", data_shape=(64,)),
     r"the conv networks need images of shape \(28, 28, 1\), but data_shape is \(64,\); use --network mlp"),
    (dict(network="resnet"), r"unknown network 'resnet'; choose one of mlp, conv"),
    (dict(likelihood="poisson"), r"unknown likelihood 'poisson'; choose one of bernoulli, gaussian"),
    (dict(latent_dim=0), r"latent_dim must be >= 1, got 0"),
])
def test_vae_config_errors(kwargs, match, assert_one_line):
    with pytest.raises(ValueError, match=match) as err:
        VAEConfig(**kwargs)
    assert_one_line(err.value)


def test_conv_encoder_rejects_wrong_image_shape(assert_one_line):
    with pytest.raises(ValueError, match=r"ConvEncoder expects images of shape \(28, 28, 1\) .* got trailing shape "
                                         r"\(8, 8, 1\); reshape the data to \(N, 28, 28, 1\)") as err:
        networks.ConvEncoder(out=4).init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    assert_one_line(err.value)
    with pytest.raises(ValueError, match=r"got trailing shape \(1, 28, 28\)") as err:  # channels first
        networks.ConvEncoder(out=4).init(jax.random.key(0), jnp.zeros((2, 1, 28, 28)))
    assert_one_line(err.value)


def test_unknown_activation(assert_one_line):
    with pytest.raises(ValueError, match=r"unknown activation 'sigmoidish'; choose one of tanh, relu") as err:
        networks.get_activation("sigmoidish")
    assert_one_line(err.value)


def test_mlp_handles_leading_axes():
    """Networks work per example and on any leading batch axes (models are written per example and vmapped)."""
    mlp = networks.MLP(hidden=(8,), out=3, in_ndims=2)
    params = mlp.init(jax.random.key(0), jnp.zeros((4, 4)))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 4, 4)), jnp.float32)
    out = jax.jit(mlp.apply)(params, x)
    chex.assert_shape(out, (2, 5, 3))
    np.testing.assert_allclose(out[1, 2], jax.jit(mlp.apply)(params, x[1, 2]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("taps", [True, False])
@pytest.mark.parametrize("size,block_bytes,activation", [
    ((3, 14, 14, 5), 4 << 20, None), ((2, 7, 9, 4), 4 << 20, "tanh"),
    ((7, 5, 6, 3), 30000, None), ((7, 5, 6, 3), 30000, "relu"),  # 7 examples in blocks of 3, 2 padded
])
def test_conv_transpose_2x_equals_flax_conv_transpose(size, block_bytes, activation, taps, monkeypatch):
    """The decoder's stride-2 transposed conv (tap-map form, or the phase convolution), with the bias and the
    activation applied inside its blocks, computes nn.ConvTranspose's function followed by the activation, with the
    same parameters: outputs and gradients agree to float32 rounding, in one block of examples or in several with a
    zero-padded last one."""
    import flax.linen as nn

    from dlvm_jax import networks
    from dlvm_jax.networks import ConvTranspose2x

    monkeypatch.setattr(networks, "BLOCK_BYTES", block_bytes)
    if block_bytes < 4 << 20:
        assert networks._block_size(size[0], networks._transpose2x_maps_bytes(
            jnp.zeros(size), jnp.zeros((3, 3, size[-1], 6)))) == 3

    x = jax.random.normal(jax.random.key(0), size)
    flax_layer = nn.ConvTranspose(6, (3, 3), strides=(2, 2), padding="SAME")
    act = networks.get_activation(activation) if activation else (lambda v: v)
    params = flax_layer.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    ours = ConvTranspose2x(6, taps=taps, activation=activation)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)

    class Reference:  # flax's layer, then the activation
        @staticmethod
        def apply(p, x):
            return act(flax_layer.apply(p, x))

    reference = Reference()
    want, got = reference.apply(params, x), ours.apply(params, x)
    assert got.shape == (size[0], 2 * size[1], 2 * size[2], 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if activation == "relu":
        assert 0.2 < np.mean(np.asarray(got) == 0) < 0.8  # both sides of the kink are exercised

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    # Gradients with respect to the parameters and the input: the backward pass is a different formulation
    # (transpose2x and its custom VJP), so both must be checked.
    g_want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    g_got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    assert g_got[1].shape == x.shape
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,features", [((3, 28, 28, 5), 1), ((2, 7, 9, 4), 3)])
def test_tap_conv_equals_flax_conv(size, features):
    """TapConv (a 3x3 conv as one matmul onto the taps' maps and shifted adds) is nn.Conv(features, (3, 3),
    padding="SAME"): same parameter tree and initial values, outputs and gradients (parameters and input)."""
    import flax.linen as nn

    from dlvm_jax.networks import TapConv

    x = jax.random.normal(jax.random.key(0), size)
    reference = nn.Conv(features, (3, 3), padding="SAME")
    params = reference.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(TapConv(features).init(jax.random.key(1), x), params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    want, got = reference.apply(params, x), TapConv(features).apply(params, x)
    assert got.shape == size[:3] + (features,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    g_want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    g_got = jax.grad(loss(TapConv(features)), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_inputs", [1, 2, 8, 9])
def test_few_inputs_dense_equals_matmul(num_inputs):
    """Dense layers with few inputs multiply-add instead of calling a matmul: same parameters, same outputs and
    gradients as flax's own nn.Dense."""
    mlp = networks.MLP((16,), 3)
    x = jnp.asarray(np.random.default_rng(num_inputs).standard_normal((5, 7, num_inputs)), jnp.float32)
    params = mlp.init(jax.random.key(0), x)
    ref = networks.nn.Dense(16)  # same names and shapes: Dense_0 (num_inputs, 16), Dense_1 (16, 3)
    assert params["params"]["Dense_0"]["kernel"].shape == (num_inputs, 16)
    chex.assert_trees_all_equal_shapes(params, {"params": {"Dense_0": ref.init(jax.random.key(1), x)["params"],
                                                           "Dense_1": networks.nn.Dense(3).init(
                                                               jax.random.key(1), jnp.zeros((16,)))["params"]}})
    w0, w1 = params["params"]["Dense_0"], params["params"]["Dense_1"]

    def plain(p, x):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    np.testing.assert_allclose(np.asarray(mlp.apply(params, x)), np.asarray(plain({"Dense_0": w0, "Dense_1": w1}, x)),
                               rtol=1e-5, atol=1e-5)
    ga = jax.grad(lambda p: jnp.sum(jnp.sin(mlp.apply(p, x))))(params)["params"]
    gb = jax.grad(lambda p: jnp.sum(jnp.sin(plain(p, x))))(params["params"])
    chex.assert_trees_all_close(ga, gb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Dense layer's contraction"):
        networks.few_inputs_dot(x, w0["kernel"], (((0,), (0,)), ((), ())))


@pytest.mark.parametrize("layer", ["tap_conv", "transpose2x", "transpose2x_relu", "patch_conv",
                                   "patch_conv_stride2", "patch_conv_relu", "patch_conv_nine_taps_relu",
                                   "patch_conv_rows_relu", "patch_conv_stride2_tanh"])
def test_tap_form_gradients_under_vmap(layer):
    """The tap-form and patch-form convolutions (stride 1 with these 4 -> 2 channels: the 1-D Winograd form unless
    the nine taps or the row patches are asked for) fold vmapped axes into the example axis (custom vmap rules):
    outputs and gradients through one and two levels of vmap, and with a vmapped kernel (the rules' fallback),
    equal the unbatched ones computed by flax's own layers."""
    import flax.linen as nn

    from dlvm_jax.networks import conv3x3_by_patches, conv3x3_by_taps, transpose2x

    ours = {"tap_conv": conv3x3_by_taps, "transpose2x": transpose2x, "patch_conv": conv3x3_by_patches,
            "transpose2x_relu": lambda x, k: transpose2x(x, k, k[0, 0, 0], "relu"),
            "patch_conv_stride2": lambda x, k: conv3x3_by_patches(x, k, 2),
            "patch_conv_relu": lambda x, k: conv3x3_by_patches(x, k, 1, k[0, 0, 0], "relu"),
            "patch_conv_nine_taps_relu": lambda x, k: conv3x3_by_patches(x, k, 1, k[0, 0, 0], "relu", "patches"),
            "patch_conv_rows_relu": lambda x, k: conv3x3_by_patches(x, k, 1, k[0, 0, 0], "relu", "rows"),
            "patch_conv_stride2_tanh": lambda x, k: conv3x3_by_patches(x, k, 2, k[0, 0, 0], "tanh")}[layer]
    # (the fused forms with a bias taken from the kernel, and their activation)
    after = {"patch_conv_relu": lambda y, k: nn.relu(y + k[0, 0, 0]),
             "patch_conv_nine_taps_relu": lambda y, k: nn.relu(y + k[0, 0, 0]),
             "patch_conv_rows_relu": lambda y, k: nn.relu(y + k[0, 0, 0]),
             "transpose2x_relu": lambda y, k: nn.relu(y + k[0, 0, 0]),
             "patch_conv_stride2_tanh": lambda y, k: jnp.tanh(y + k[0, 0, 0])}.get(layer, lambda y, k: y)
    features = 3 if layer.startswith("transpose2x") else 2
    if layer.startswith("transpose2x"):
        reference = nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)
    else:
        stride = 2 if "stride2" in layer else 1
        reference = nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME", use_bias=False)
    x = jax.random.normal(jax.random.key(0), (4, 3, 2, 6, 5, 4))  # (outer vmap, inner vmap, n, H, W, C)
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, features))

    def ref_loss(k, x):  # all leading axes merged into one batch, through flax's layer
        y = reference.apply({"params": {"kernel": k}}, x.reshape((-1,) + x.shape[-3:]))
        return jnp.sum(jnp.sin(after(y, k)))

    def nested_loss(k, x):
        return jnp.sum(jax.vmap(jax.vmap(lambda xi: jnp.sin(ours(xi, k))))(x))

    want = jax.grad(ref_loss, argnums=(0, 1))(kernel, x)
    got = jax.jit(jax.grad(nested_loss, argnums=(0, 1)))(kernel, x)
    np.testing.assert_allclose(jax.jit(nested_loss)(kernel, x), ref_loss(kernel, x), rtol=1e-5)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # A kernel per example (the vmap rule's fallback): each example's gradient is the unbatched one.
    kernels = jax.random.normal(jax.random.key(2), (4, 3, 3, 4, features))
    per_example = jax.vmap(jax.grad(lambda k, xi: jnp.sum(jnp.sin(ours(xi, k))), argnums=(0, 1)))(kernels, x[:, 0])
    for i in (0, 3):
        want_i = jax.grad(ref_loss, argnums=(0, 1))(kernels[i], x[i, 0])
        for a, b in zip(per_example, want_i):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,features,stride,block_bytes,activation,form", [
    # Stride 1 with F >= 3 C: nine-tap patches.
    ((3, 28, 28, 1), 4, 1, 4 << 20, None, "auto"),     # one block (the forward: multiply-adds, no blocks)
    ((4, 9, 7, 2), 7, 1, 600, "relu", "auto"),         # backward: blocks of 1 (forward: multiply-adds)
    ((4, 9, 7, 2), 7, 1, 600, "relu", "rows"),         # the same in row patches
    # Stride 1 with F < 3 C: the 1-D Winograd form (per example H ceil(W / 2) 4 (C + 3 F) floats).
    ((7, 14, 14, 6), 5, 1, 3000, "relu", "auto"),      # blocks of 1 (7 is prime)
    ((7, 14, 14, 6), 5, 1, 3000, "relu", "patches"),   # the same in nine-tap patches
    ((7, 14, 14, 6), 5, 1, 3000, "relu", "rows"),      # the same in row patches
    ((10, 14, 14, 6), 3, 1, 180_000, "tanh", "auto"),  # blocks of 5 (the largest divisor of 10 within the budget)
    ((7, 12, 9, 4), 3, 1, 40_000, None, "auto"),       # odd width; blocks of 3, the last one zero-padded
    ((7, 12, 9, 4), 3, 1, 40_000, "relu", "winograd"),
    ((7, 12, 10, 4), 3, 1, 40_000, "relu", "rows"),    # forward: blocks of 3, the last one zero-padded; backward: 1
    ((3, 5, 1, 4), 3, 1, 4 << 20, "relu", "winograd"),  # one column
    # Stride 2: nine-tap patches.
    ((5, 28, 28, 3), 4, 2, 20000, None, "auto"),       # 28 -> 14 (padding 0 above, 1 below, as XLA's "SAME")
    ((4, 9, 7, 2), 3, 2, 600, "relu", "auto"),         # odd sizes -> 5 x 4, backward blocks of 2
    ((3, 9, 7, 2), 3, 2, 600, "tanh", "patches"),      # backward: blocks of 2, the last one zero-padded
])
def test_patch_conv_equals_flax_conv(size, features, stride, block_bytes, activation, form, monkeypatch):
    """PatchConv (a 3x3 conv as blocked matmuls onto nine-tap or row patches, with the bias and the activation
    applied inside the blocks) is nn.Conv(features, (3, 3), strides, padding="SAME") followed by the activation:
    same parameter tree and initial values, outputs and gradients (parameters and input), whether the examples fit
    one block, split evenly into blocks, or leave a zero-padded last block."""
    import flax.linen as nn

    from dlvm_jax import networks
    from dlvm_jax.networks import PatchConv

    monkeypatch.setattr(networks, "BLOCK_BYTES", block_bytes)
    x = jax.random.normal(jax.random.key(0), size)
    conv = nn.Conv(features, (3, 3), strides=(stride, stride), padding="SAME")
    act = networks.get_activation(activation) if activation else (lambda v: v)
    reference = nn.Sequential([conv, act])
    params = conv.init(jax.random.key(1), x)
    ours = PatchConv(features, stride, activation, form)
    chex.assert_trees_all_equal(ours.init(jax.random.key(1), x), params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    params = {"params": {"layers_0": params["params"]}}
    want, got = reference.apply(params, x), ours.apply({"params": params["params"]["layers_0"]}, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if activation == "relu":
        assert 0.2 < np.mean(np.asarray(got) == 0) < 0.8  # both sides of the kink are exercised

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    g_want = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    g_want = (g_want[0]["params"]["layers_0"], g_want[1])
    g_got = jax.grad(loss(ours), argnums=(0, 1))({"params": params["params"]["layers_0"]}, x)
    g_got = (g_got[0]["params"], g_got[1])
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # The input as data (a first layer's): the backward pass without the input gradient, plain and vmapped per
    # example as the losses run it.
    ours_params = {"params": params["params"]["layers_0"]}
    per_example = lambda p: jnp.sum(jax.vmap(lambda xi: loss(ours)(p, xi[None]))(x))  # noqa: E731
    for g in (jax.grad(loss(ours))(ours_params, x), jax.grad(per_example)(ours_params)):
        for a, b in zip(jax.tree.leaves(g["params"]), jax.tree.leaves(g_want[0])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,form", [(1, "patches"), (1, "rows"), (1, "winograd"), (2, "patches")])
def test_patch_conv_skips_an_input_gradient_nobody_reads(stride, form):
    """Differentiated with respect to the weights alone (the input is data), the patch form's backward pass has
    no input-gradient matmul: fewer dot_generals than with the input's gradient asked for too."""
    from dlvm_jax.networks import conv3x3_by_patches

    x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))

    def loss(k, x):
        return jnp.sum(conv3x3_by_patches(x, k, stride, form=form, activation="relu") ** 2)

    def dots(argnums):
        return str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(kernel, x)).count("dot_general")

    assert dots(0) < dots((0, 1))
    np.testing.assert_allclose(jax.grad(loss)(kernel, x), jax.grad(loss, argnums=(0, 1))(kernel, x)[0], rtol=1e-6)


@pytest.mark.parametrize("channels,stride,matmuls", [(1, 1, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_patch_conv_forward_multiply_adds_few_input_channels(channels, stride, matmuls):
    """With at most FEW_INPUTS input channels (a first layer on images) the patch form's forward pass is broadcast
    multiply-adds, no matmul; with more, one matmul onto the patches. Both equal XLA's convolution."""
    from dlvm_jax.networks import conv3x3_by_patches

    x = jax.random.normal(jax.random.key(0), (2, 9, 8, channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, 5))
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv3x3_by_patches(x, k, stride, form="patches"))(x, kernel))
    assert jaxpr.count("dot_general") == matmuls
    want = jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(conv3x3_by_patches(x, kernel, stride, form="patches"), want, rtol=1e-5, atol=1e-5)


def test_patch_block_size():
    """Blocks are the largest divisor of the example count that fits the byte budget, unless it is under half of
    what fits (then the blocks that fit, the last one padded); at least one example per block."""
    from dlvm_jax.networks import _block_size

    assert _block_size(100, 451_584) == 5  # 9 fit; 5 divides 100
    assert _block_size(100, 100) == 100
    assert _block_size(97, 451_584) == 9  # prime: 9 per block, the last padded
    assert _block_size(3, 10**9) == 1
    from dlvm_jax.networks import conv3x3_by_patches

    with pytest.raises(ValueError, match="conv3x3_by_patches expects"):
        conv3x3_by_patches(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 3, 4)))
    with pytest.raises(ValueError, match="bias of shape"):
        conv3x3_by_patches(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="applies only the activations relu, tanh.*'elu'"):
        conv3x3_by_patches(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), activation="elu")
    with pytest.raises(ValueError, match="form must be one of"):
        conv3x3_by_patches(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), form="im2col")
    with pytest.raises(ValueError, match="needs stride 1"):
        conv3x3_by_patches(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), 2, form="rows")
    with pytest.raises(ValueError, match="form='winograd' needs stride 1"):
        conv3x3_by_patches(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), 2, form="winograd")
    from dlvm_jax.networks import transpose2x

    with pytest.raises(ValueError, match="transpose2x expects"):
        transpose2x(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 3, 4)))
    with pytest.raises(ValueError, match="transpose2x expects a bias of shape"):
        transpose2x(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), jnp.zeros(2))
    with pytest.raises(ValueError, match="transpose2x applies only"):
        transpose2x(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), activation="gelu")


@pytest.mark.parametrize("activation", ["relu", "elu"])  # fused into the patch form's blocks, or applied after
def test_conv_encoder_convs_options_agree(activation):
    """ConvEncoder(convs="patches") and convs="xla" share parameters (nn.Conv's, named Conv_0 to Conv_3) and compute
    the same function and gradients, per example under vmap as the losses run it; an unknown option is refused."""
    from dlvm_jax.networks import ConvEncoder

    x = (jax.random.uniform(jax.random.key(0), (3, 28, 28, 1)) > 0.5).astype(jnp.float32)
    patches, xla = ConvEncoder(4, activation=activation), ConvEncoder(4, activation=activation, convs="xla")
    params = patches.init(jax.random.key(1), x)
    chex.assert_trees_all_equal(xla.init(jax.random.key(1), x), params)
    assert sorted(params["params"]) == ["Conv_0", "Conv_1", "Conv_2", "Conv_3", "Dense_0", "Dense_1"]
    np.testing.assert_allclose(patches.apply(params, x), xla.apply(params, x), rtol=1e-5, atol=1e-5)

    def loss(m):
        return lambda p: jnp.sum(jax.vmap(lambda xi: jnp.sin(m.apply(p, xi)))(x))

    grads = [jax.jit(jax.grad(loss(m)))(params) for m in (patches, xla)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="convs"):
        ConvEncoder(4, convs="cudnn").init(jax.random.key(1), x)


@pytest.mark.parametrize("activation", ["relu", "elu"])  # fused into the tap-map form's blocks, or applied after
def test_conv_decoder_convs_options_agree(activation):
    """ConvDecoder(convs="taps") and convs="xla" share parameters and compute the same function and gradients;
    an unknown option is refused."""
    from dlvm_jax.networks import ConvDecoder

    z = jax.random.normal(jax.random.key(0), (2, 3, 2))
    taps, xla = ConvDecoder(2, activation=activation), ConvDecoder(2, activation=activation, convs="xla")
    params = taps.init(jax.random.key(1), z)
    chex.assert_trees_all_equal(xla.init(jax.random.key(1), z), params)
    np.testing.assert_allclose(taps.apply(params, z), xla.apply(params, z), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda p, m=m: jnp.sum(jnp.sin(m.apply(p, z))))(params) for m in (taps, xla)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="convs"):
        ConvDecoder(convs="cudnn").init(jax.random.key(1), z)


def test_conv_decoder_xla_convs_allow_higher_derivatives():
    """What ConvDecoder's docstring promises: convs="xla" supports second derivatives (and forward mode with a
    latent wider than FEW_INPUTS), while the tap-map forms are reverse-mode only and say so by raising."""
    from dlvm_jax.networks import ConvDecoder

    z = jax.random.normal(jax.random.key(0), (2, 3))
    for convs in ("xla", "taps"):
        decoder = ConvDecoder(1, convs=convs)
        params = decoder.init(jax.random.key(1), z)

        def hvp(z, decoder=decoder, params=params):
            return jax.grad(lambda z: jnp.sum(jax.grad(lambda z: jnp.sum(jnp.sin(decoder.apply(params, z))))(z)))(z)

        def jvp(z, decoder=decoder, params=params):
            return jax.jvp(lambda z: decoder.apply(params, z), (z,), (jnp.ones_like(z),))[1]

        if convs == "xla":
            assert hvp(z).shape == z.shape and bool(jnp.all(jnp.isfinite(hvp(z))))
            # Forward mode against the reverse-mode Jacobian times the same tangent.
            jac = jax.jacrev(lambda z: decoder.apply(params, z))(z)  # (2, 784, 2, 3)
            np.testing.assert_allclose(jvp(z), jnp.einsum("aibj,bj->ai", jac, jnp.ones_like(z)), rtol=1e-4,
                                       atol=1e-5)
        else:
            with pytest.raises((TypeError, ValueError)):
                hvp(z)
            with pytest.raises(TypeError):
                jvp(z)


def test_conv_encoder_patch_form_is_reverse_mode_only():
    """What ConvEncoder's docstring promises: convs="xla" supports second derivatives, while the patch form is a
    custom VJP and says so by raising."""
    from dlvm_jax.networks import ConvEncoder

    x = jax.random.uniform(jax.random.key(0), (28, 28, 1))
    for convs in ("xla", "patches"):
        encoder = ConvEncoder(2, convs=convs)
        params = encoder.init(jax.random.key(1), x)

        def input_hvp(x, encoder=encoder, params=params):
            return jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(encoder.apply(params, x))))(x)))(x)

        if convs == "xla":
            assert bool(jnp.all(jnp.isfinite(input_hvp(x))))
        else:
            with pytest.raises((TypeError, ValueError)):
                input_hvp(x)
