"""train.py: the jitted step and epoch compile once, fit() trains and logs, parameter files round-trip."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dlvm_jax import objectives, train


def _fresh(params):
    """A copy of (session-scoped) parameters: the train step DONATES its state, which would delete the
    fixture's buffers for every later test."""
    return jax.tree.map(jnp.array, params)


def _quadratic_loss(params, batch, key, step):
    """A tiny deterministic loss (fast to compile) for testing the loop machinery: mean squared distance."""
    del key, step
    loss = jnp.mean(jnp.sum(jnp.square(batch - params["w"]), axis=-1))
    return loss, {"loss": loss, "mean_x": jnp.mean(batch)}


def test_train_step_compiles_once(small_vae, small_vae_params, digits):
    """A second call with new data of the same shape reuses the compiled step: the loss is traced once."""
    traces = []
    base = objectives.make_loss(small_vae)

    def counted(params, batch, key, step):
        traces.append(batch.shape)  # a Python side effect runs only while tracing
        return base(params, batch, key, step)

    chex.clear_trace_counter()
    loss_fn = chex.assert_max_traces(counted, n=1)  # raises if the step retraces the loss
    optimizer = optax.adam(1e-3)
    step = train.make_train_step(loss_fn, optimizer)
    state = train.init_state(_fresh(small_vae_params), optimizer, jax.random.key(0))
    x = jnp.asarray(digits.x_train)
    before = jax.device_get(state.params)
    state, m1 = step(state, x[:64])
    state, m2 = step(state, x[64:128])  # new data, same shape
    state, m3 = step(state, x[128:192])
    assert len(traces) == 1, traces
    assert int(state.step) == 3
    assert set(m1) >= {"loss", "elbo", "rec", "kl"}
    assert all(math.isfinite(float(m["loss"])) for m in (m1, m2, m3))
    # The parameters moved and the key advanced.
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before,
                           jax.device_get(state.params))
    assert all(jax.tree.leaves(changed))
    # The counter is live: a new batch shape must retrace (and chex refuses a second trace).
    with pytest.raises(AssertionError, match="trace"):
        step(state, x[:32])


def test_epoch_compiles_once_and_covers_the_data():
    traces = []

    def counted(params, batch, key, step):
        traces.append(batch.shape)
        return _quadratic_loss(params, batch, key, step)

    optimizer = optax.sgd(0.1)
    epoch = train.make_epoch(counted, optimizer, batch_size=16)
    rng = np.random.default_rng(0)
    data1 = jnp.asarray(rng.standard_normal((100, 3)) + 2.0, jnp.float32)
    data2 = jnp.asarray(rng.standard_normal((100, 3)) - 1.0, jnp.float32)
    state = train.init_state({"w": jnp.zeros(3)}, optimizer, jax.random.key(0))
    state, metrics = epoch(state, data1)
    n_traces = len(traces)
    assert n_traces >= 1 and all(s == (16, 3) for s in traces)
    state, metrics2 = epoch(state, data2)  # new data, same shape: no retrace
    assert len(traces) == n_traces
    assert int(state.step) == 2 * (100 // 16)  # 6 full batches per epoch, the remainder of 4 left out
    # Batches are drawn from the data given (the epoch mean of batch means is near the data mean; 96 of 100
    # rows are used, so the difference is at most 4 rows' worth).
    assert float(metrics2["mean_x"]) == pytest.approx(float(jnp.mean(data2)), abs=0.2)
    assert float(metrics["mean_x"]) == pytest.approx(float(jnp.mean(data1)), abs=0.2)


def test_fit_trains_a_small_vae(small_vae, small_vae_params, digits, tmp_path):
    """fit() on the 8x8 digits: the test ELBO improves by several nats in a few seconds; the JSON-lines log
    starts with an epoch-0 record; the checkpoint holds the final parameters."""
    loss_fn = objectives.make_loss(small_vae)
    optimizer = optax.adam(1e-2)
    state = train.init_state(_fresh(small_vae_params), optimizer, jax.random.key(1))
    metrics_path, ckpt_path = tmp_path / "metrics.jsonl", tmp_path / "params.msgpack"
    state, history = train.fit(state, digits.x_train, loss_fn=loss_fn, optimizer=optimizer, batch_size=100,
                               epochs=30, test_data=digits.x_test, eval_every=10, metrics_path=metrics_path,
                               checkpoint_path=ckpt_path, progress=False)
    assert [h["epoch"] for h in history] == [0, 10, 20, 30]
    assert "train_loss" not in history[0] and "test_elbo" in history[0]
    first, last = history[0]["test_elbo"], history[-1]["test_elbo"]
    # Measured: about -30.5 -> -24.5 nats. 3 nats is far beyond the noise of the (fixed-key) evaluation.
    assert last > first + 3.0, (first, last)
    assert math.isfinite(history[-1]["train_loss"]) and history[-1]["step"] == 30 * (len(digits.x_train) // 100)
    records = train.read_jsonl(metrics_path)
    assert records == history
    assert records[0]["epoch"] == 0 and records[0]["step"] == 0
    np.testing.assert_array_equal(train.stack_metrics(records, "epoch"), [0, 10, 20, 30])
    assert train.stack_metrics(records, "train_loss").shape == (3,)
    loaded = train.load_params(ckpt_path, small_vae_params)
    chex.assert_trees_all_equal(loaded, jax.device_get(state.params))


def test_fit_time_limit_and_eval_every(tmp_path):
    optimizer = optax.sgd(0.1)
    data = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)
    state = train.init_state({"w": jnp.zeros(3)}, optimizer, jax.random.key(0))
    # time_limit=0: the first epoch is over time, so the loop records it and stops.
    state, history = train.fit(state, data, loss_fn=_quadratic_loss, optimizer=optimizer, batch_size=8,
                               epochs=1000, time_limit=0.0, progress=False)
    assert [h["epoch"] for h in history] == [0, 1]
    assert int(state.step) == 8


def test_fit_raises_on_non_finite_loss(assert_one_line):
    def nan_loss(params, batch, key, step):
        loss = jnp.sum(params["w"]) * jnp.nan
        return loss, {"loss": loss}

    optimizer = optax.sgd(0.1)
    state = train.init_state({"w": jnp.ones(3)}, optimizer, jax.random.key(0))
    with pytest.raises(FloatingPointError, match=r"non-finite in epoch 1 .*; lower the learning rate") as err:
        train.fit(state, np.ones((16, 3), np.float32), loss_fn=nan_loss, optimizer=optimizer, batch_size=8,
                  epochs=3, progress=False)
    assert_one_line(err.value)


def test_evaluator_weights_the_remainder():
    """Averages over EVERY example, the last partial batch weighted by its size (250 = 2 x 100 + 50)."""
    evaluate = train.make_evaluator(_quadratic_loss, batch_size=100)
    data = jnp.asarray(np.random.default_rng(0).standard_normal((250, 3)), jnp.float32)
    out = evaluate({"w": jnp.zeros(3)}, data, jax.random.key(0))
    ref = np.asarray(data, np.float64)
    assert out["mean_x"] == pytest.approx(ref.mean(), abs=1e-6)
    assert out["loss"] == pytest.approx(np.sum(ref**2, axis=1).mean(), rel=1e-5)


def test_save_load_params_roundtrip(small_vae_params, tmp_path):
    path = tmp_path / "p.msgpack"
    train.save_params(path, small_vae_params)
    assert not (tmp_path / "p.msgpack.tmp").exists()  # written atomically
    loaded = train.load_params(path, small_vae_params)
    chex.assert_trees_all_equal(loaded, jax.device_get(small_vae_params))
    chex.assert_trees_all_equal_structs(loaded, small_vae_params)
    # Any pytree of arrays works, e.g. a whole optimizer state.
    opt_state = optax.adam(1e-3).init(small_vae_params)
    train.save_params(tmp_path / "opt.msgpack", opt_state)
    chex.assert_trees_all_equal(train.load_params(tmp_path / "opt.msgpack", opt_state), jax.device_get(opt_state))


def test_load_params_errors(small_vae_params, tmp_path, assert_one_line):
    with pytest.raises(FileNotFoundError, match="no parameter file at"):
        train.load_params(tmp_path / "missing.msgpack", small_vae_params)
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\x00not msgpack at all\n\n")
    with pytest.raises(ValueError, match=r"cannot read parameters from .*bad\.msgpack") as err:
        train.load_params(bad, small_vae_params)
    assert_one_line(err.value)
    # A file with a different structure (a linear-Gaussian model's parameters) is refused in one line too.
    other = tmp_path / "other.msgpack"
    train.save_params(other, {"generative": {"W": np.zeros((5, 2), np.float32)}})
    with pytest.raises(ValueError, match="cannot read parameters from") as err:
        train.load_params(other, small_vae_params)
    assert_one_line(err.value)


@pytest.mark.parametrize("batch_size, n, match", [
    (200, 100, r"batch size 200 is larger than the dataset \(100 examples\); use --batch-size 100 or less"),
    (0, 100, r"batch size must be an integer >= 1, got 0"),
    (2.5, 100, r"batch size must be an integer >= 1, got 2.5"),
])
def test_check_batch_size(batch_size, n, match, assert_one_line):
    with pytest.raises(ValueError, match=match) as err:
        train.check_batch_size(batch_size, n)
    assert_one_line(err.value)


def test_fit_rejects_batch_larger_than_dataset(assert_one_line):
    optimizer = optax.sgd(0.1)
    state = train.init_state({"w": jnp.zeros(3)}, optimizer, jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch size 64 is larger than the dataset \(10 examples\)") as err:
        train.fit(state, np.zeros((10, 3), np.float32), loss_fn=_quadratic_loss, optimizer=optimizer, batch_size=64,
                  epochs=1, progress=False)
    assert_one_line(err.value)
    with pytest.raises(ValueError, match=r"epochs must be >= 0, got -1") as err:
        train.fit(state, np.zeros((10, 3), np.float32), loss_fn=_quadratic_loss, optimizer=optimizer, batch_size=5,
                  epochs=-1, progress=False)
    assert_one_line(err.value)


def test_fit_restarts_keeps_the_best_objective(tmp_path):
    """Restarts train side by side; the kept one has the best recorded training objective, and its state is the
    same as that restart's slice."""
    import optax as _optax

    from dlvm_jax import data as _data
    from dlvm_jax.models import VAE as _VAE, VAEConfig as _VAEConfig
    from dlvm_jax.objectives import make_loss as _make_loss
    from dlvm_jax.train import fit_restarts, read_jsonl

    ds = _data.digits()
    model = _VAE(_VAEConfig(data_shape=(64,), latent_dim=2, hidden=(16,), likelihood="continuous_bernoulli"))
    state, history, sel = fit_restarts(
        model, ds.x_train[:400], init_fn=model.init, loss_fn=_make_loss(model), optimizer=_optax.adam(1e-3),
        key=jax.random.key(0), restarts=3, batch_size=100, epochs=3, test_data=ds.x_test[:100], eval_every=1,
        metrics_path=tmp_path / "m.jsonl", progress=False)
    assert sel["restarts"] == 3 and len(sel["train_objective"]) == 3 and len(sel["train_log_px"]) == 3
    assert sel["chosen"] == int(np.argmax(sel["train_objective"]))
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert all(np.isscalar(h["test_elbo"]) for h in history)  # reduced to the chosen restart
    records = read_jsonl(tmp_path / "m.jsonl")
    assert len(records[1]["train_loss"]) == 3 and "selection" in records[-1]
    assert int(state.step) == 3 * 4  # 400 points, batch 100, 3 epochs
    with pytest.raises(ValueError, match="unknown selection criterion"):
        fit_restarts(model, ds.x_train[:200], init_fn=model.init, loss_fn=_make_loss(model),
                     optimizer=_optax.adam(1e-3), key=jax.random.key(0), restarts=2, batch_size=100, epochs=1,
                     select="best", progress=False)


def test_stepped_epoch_matches_scanned_epoch():
    """fit(scan=False) dispatches one step per batch; the trajectory is the same as the scanned epoch's."""
    from dlvm_jax.models import VAE as _VAE, VAEConfig as _VAEConfig
    from dlvm_jax.objectives import make_loss as _make_loss

    model = _VAE(_VAEConfig(data_shape=(6,), latent_dim=2, hidden=(8,), likelihood="gaussian"))
    data = jax.random.normal(jax.random.key(0), (64, 6))
    opt = optax.adam(1e-2)
    loss = _make_loss(model)
    a = train.init_state(model.init(jax.random.key(1)), opt, jax.random.key(2))
    b = jax.tree.map(jnp.copy, a)
    a, ma = train.make_epoch(loss, opt, batch_size=16)(a, data)
    b, mb = train.make_stepped_epoch(loss, opt, batch_size=16)(b, data)
    assert int(a.step) == int(b.step) == 4
    # Same keys, same batches, same updates; only the order of float operations may differ.
    chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)


def test_sharded_step_compiles_once_and_skips_non_finite_updates():
    """make_train_step on a device mesh: traced once for many batches; with skip_nonfinite an update whose loss or
    gradient is non-finite leaves parameters and optimizer state exactly as they were."""
    from dlvm_jax import parallel

    traces = []

    def loss_fn(params, batch, key, step):
        traces.append(batch.shape)
        loss = jnp.mean(jnp.sum(jnp.square(batch - params["w"]), axis=-1)) * jnp.where(batch[0, 0] > 100, jnp.nan, 1)
        return loss, {"loss": loss}

    mesh = parallel.make_mesh(1)
    optimizer = optax.adam(0.1)
    step = train.make_train_step(loss_fn, optimizer, mesh=mesh, skip_nonfinite=True)
    state = parallel.replicate(train.init_state({"w": jnp.zeros(3)}, optimizer, jax.random.key(0)), mesh)
    good = np.ones((8, 3), np.float32)
    state, _ = step(state, parallel.shard_batch(good, mesh))
    before = jax.device_get((state.params, state.opt_state))
    state, metrics = step(state, parallel.shard_batch(good * 1000, mesh))  # NaN loss: skipped
    assert not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(jax.device_get((state.params, state.opt_state)), before)
    assert int(state.step) == 2  # the step counter (and the key) still advance
    state, _ = step(state, parallel.shard_batch(good, mesh))
    assert len(traces) == 1 and float(state.params["w"][0]) > float(before[0]["w"][0])


def test_eval_batch_size_is_a_multiple_of_the_batch_size():
    assert [train.eval_batch_size(b) for b in (8, 64, 100, 128, 200)] == [104, 128, 100, 128, 200]


# ------------------------------------------------------------------------------------------------------------
# Gradients accumulated over microbatches (objectives.microbatched)
# ------------------------------------------------------------------------------------------------------------


def test_microbatched_gradient_is_the_whole_batch_gradient():
    """For a loss that is a batch mean of per-example terms and draws no noise, the mean over equal microbatches
    of their mean losses and gradients IS the whole batch's: equal to float rounding (1e-6 relative)."""
    batch = jax.random.normal(jax.random.key(0), (24, 3)) + 2.0
    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    key, step = jax.random.key(1), jnp.zeros((), jnp.int32)
    (loss, metrics), grads = jax.value_and_grad(_quadratic_loss, has_aux=True)(params, batch, key, step)
    for size in (1, 6, 8, 24):
        mb = objectives.microbatched(_quadratic_loss, size)
        (mloss, mmetrics), mgrads = jax.jit(lambda p, b, k, s: objectives.value_and_grad(mb, p, b, k, s))(
            params, batch, key, step)
        np.testing.assert_allclose(float(mloss), float(loss), rtol=1e-6)
        np.testing.assert_allclose(float(mmetrics["mean_x"]), float(metrics["mean_x"]), rtol=1e-6)
        np.testing.assert_allclose(mgrads["w"], grads["w"], rtol=1e-6, atol=1e-6)
        called, _ = mb(params, batch, key, step)  # called without a gradient: the same mean
        np.testing.assert_allclose(float(called), float(loss), rtol=1e-6)


def test_microbatched_is_the_mean_over_strided_microbatches(small_vae, small_vae_params, digits):
    """With noise: microbatch i holds examples i, i + count, ... and draws from fold_in(key, i); the accumulated
    loss, metrics and gradient are the means of value_and_grad over those microbatches (1e-5 relative: float32
    sums in another order)."""
    loss_fn = objectives.make_loss(small_vae)
    batch = jnp.asarray(digits.x_train[:12])
    key, step = jax.random.key(3), jnp.zeros((), jnp.int32)
    mb = objectives.microbatched(loss_fn, 4)
    (loss, metrics), grads = jax.jit(lambda p: objectives.value_and_grad(mb, p, batch, key, step))(small_vae_params)
    parts = [jax.value_and_grad(loss_fn, has_aux=True)(small_vae_params, batch[i::3], jax.random.fold_in(key, i), step)
             for i in range(3)]
    np.testing.assert_allclose(float(loss), np.mean([float(p[0][0]) for p in parts]), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), np.mean([float(p[0][1]["kl"]) for p in parts]), rtol=1e-5)
    expected = jax.tree.map(lambda *g: sum(g) / 3, *[p[1] for p in parts])
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-6)
    # And not the whole batch's noise: a different draw, so a different (but close) loss.
    whole = float(loss_fn(small_vae_params, batch, key, step)[0])
    assert whole != float(loss) and abs(whole - float(loss)) < 0.2 * abs(whole)


def test_train_step_and_fit_with_a_microbatched_loss():
    """make_train_step and fit (scanned and stepped) take a microbatched loss: with a noiseless per-example loss
    the parameters follow the whole-batch run (1e-5), and the traced loss sees microbatches."""
    shapes = []

    def counted(params, batch, key, step):
        shapes.append(batch.shape)
        return _quadratic_loss(params, batch, key, step)

    data = jax.random.normal(jax.random.key(0), (64, 3)) + 1.0
    opt = optax.adam(0.1)
    fresh = lambda: train.init_state({"w": jnp.zeros(3)}, opt, jax.random.key(1))  # noqa: E731
    step, mstep = train.make_train_step(_quadratic_loss, opt), train.make_train_step(
        objectives.microbatched(counted, 4), opt)
    a, b = fresh(), fresh()
    for i in range(4):
        a, ma = step(a, data[16 * i:16 * (i + 1)])
        b, mb = mstep(b, data[16 * i:16 * (i + 1)])
    assert set(shapes) == {(4, 3)}
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(mb["loss"]), float(ma["loss"]), rtol=1e-5)
    results = []
    for scan in (True, False):
        state, history = train.fit(fresh(), data, loss_fn=objectives.microbatched(_quadratic_loss, 8), optimizer=opt,
                                   batch_size=16, epochs=2, progress=False, scan=scan)
        results.append((state.params, history[-1]["train_loss"]))
    ref, ref_history = train.fit(fresh(), data, loss_fn=_quadratic_loss, optimizer=opt, batch_size=16, epochs=2,
                                 progress=False)
    for params, last in results:
        chex.assert_trees_all_close(params, ref.params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(last, ref_history[-1]["train_loss"], rtol=1e-5)


def test_microbatched_errors(assert_one_line):
    with pytest.raises(ValueError, match="integer >= 1") as err:
        objectives.microbatched(_quadratic_loss, 0)
    assert_one_line(err.value)
    mb = objectives.microbatched(_quadratic_loss, 5)
    with pytest.raises(ValueError, match="microbatched already"):
        objectives.microbatched(mb, 5)
    params, key, step = {"w": jnp.zeros(3)}, jax.random.key(0), jnp.zeros((), jnp.int32)
    with pytest.raises(ValueError, match="cannot be cut into microbatches of 5") as err:
        objectives.value_and_grad(mb, params, jnp.ones((12, 3)), key, step)
    assert_one_line(err.value)
    opt = optax.sgd(0.1)
    with pytest.raises(ValueError, match="not a multiple of the microbatch size 5") as err:
        train.fit(train.init_state(params, opt, key), jnp.ones((64, 3)), loss_fn=mb, optimizer=opt, batch_size=16,
                  epochs=1, progress=False)
    assert_one_line(err.value)
