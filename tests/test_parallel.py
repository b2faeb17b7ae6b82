"""parallel.py: one code path for 1..N devices.

The multi-device checks run in ONE subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(JAX reads the flag once, when its CPU backend starts, and this pytest process has started it already with one
device). Inside it the same programs run on a mesh of the first device and on a mesh of all 8, from the same
global batches and keys; the subprocess prints a JSON report that the tests below check.

The 8 devices are simulated on the machine's CPU cores: this tests the partitioning (XLA splits every batch and
all-reduces the gradient), not speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dlvm_jax import parallel

ROOT = Path(__file__).resolve().parents[1]
STEPS = 50
GLOBAL_BATCH = 64
UNWAITED_STEPS = 200


def _worker() -> None:
    """Runs in the 8-device subprocess; prints one JSON line."""
    import jax.numpy as jnp
    import optax

    from dlvm_jax import data, train
    from dlvm_jax.models import VAE, VAEConfig
    from dlvm_jax.objectives import make_loss

    assert jax.device_count() == 8, jax.devices()
    ds = data.digits()
    x = np.asarray(ds.x_train[: STEPS * GLOBAL_BATCH // 4])  # 800 rows, cycled through in batches of 64
    model = VAE(VAEConfig(data_shape=(64,), latent_dim=4, hidden=(32,), likelihood="continuous_bernoulli"))
    loss_fn = make_loss(model)
    optimizer = optax.adam(1e-3)
    report: dict = {"devices": jax.device_count(), "seconds": {}}
    import time

    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        report["seconds"][name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    def fresh(mesh):
        state = train.init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1))
        return parallel.replicate(state, mesh)

    # 1. The jitted train step, 50 steps, same global batches and keys on 1 and on 8 devices.
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        step = train.make_train_step(loss_fn, optimizer, mesh=mesh)
        state = fresh(mesh)
        losses = []
        for i in range(STEPS):
            start = (i * GLOBAL_BATCH) % x.shape[0]
            batch = parallel.shard_batch(x[start:start + GLOBAL_BATCH], mesh)
            if i == 0:
                report[f"batch_devices_{n}"] = len(batch.sharding.device_set)
                report[f"batch_shard_rows_{n}"] = sorted({s.data.shape[0] for s in batch.addressable_shards})
                if n == 8:  # the partitioned program sums the gradient over the devices
                    report["all_reduce_in_step_8"] = "all-reduce" in step.lower(state, batch).compile().as_text()
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])  # read after the loop: no host synchronisation per step
        leaf = jax.tree.leaves(state.params)[0]
        report[f"params_replicated_{n}"] = bool(leaf.sharding.is_fully_replicated) and len(leaf.sharding.device_set) == n
        report[f"losses_{n}"] = [float(v) for v in losses]
        report[f"params_{n}"] = [np.asarray(a).ravel().tolist() for a in jax.tree.leaves(jax.device_get(state.params))]
        lap(f"steps_{n}")

    # 2. fit(): scanned epochs, the data replicated, each batch split inside the scan; test ELBO on split batches.
    for n in (1, 8):
        state, history = train.fit(train.init_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1)),
                                   x, loss_fn=loss_fn, optimizer=optimizer, batch_size=GLOBAL_BATCH, epochs=2,
                                   test_data=ds.x_test[:200], progress=False, mesh=parallel.make_mesh(n))
        report[f"fit_history_{n}"] = [{k: v for k, v in h.items() if k != "seconds"} for h in history]
        lap(f"fit_{n}")

    # 3. A microbatched loss: each microbatch of 16 (strided over the global batch) split over the devices.
    from dlvm_jax.objectives import microbatched

    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        step = train.make_train_step(microbatched(loss_fn, 16), optimizer, mesh=mesh)
        state, losses = fresh(mesh), []
        for i in range(5):
            state, metrics = step(state, parallel.shard_batch(x[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH], mesh))
            losses.append(metrics["loss"])
        report[f"microbatched_losses_{n}"] = [float(v) for v in losses]
        lap(f"microbatched_{n}")
    try:  # microbatches of 12 do not split over 8 devices
        train.make_train_step(microbatched(loss_fn, 12), optimizer, mesh=parallel.make_mesh(8))
    except ValueError as err:
        report["microbatch_error_8"] = str(err)

    # 4. Importance-sampled log p(x), each batch split over the devices.
    params = jax.device_get(fresh(parallel.make_mesh(1)).params)
    for n in (1, 8):
        est = parallel.log_likelihood(model, params, ds.x_test[:45], jax.random.key(3), mesh=parallel.make_mesh(n),
                                      num_samples=64, chunk_size=32, batch_size=16, progress=False)
        report[f"is_{n}"] = {field: np.asarray(getattr(est, field)).tolist() for field in est._fields}
        lap(f"is_{n}")

    # 5. Many steps dispatched without waiting, each long enough (the 784-200-200-50 VAE) for the dispatch to run
    #    ahead: more than ~32 queued calls deadlock XLA:CPU's all-reduce and abort this process after 40 s.
    from dlvm_jax import runtime

    mesh = parallel.make_mesh(8)
    big = VAE(VAEConfig())
    step = train.make_train_step(make_loss(big), optimizer, mesh=mesh)
    state = parallel.replicate(train.init_state(big.init(jax.random.key(0)), optimizer, jax.random.key(1)), mesh)
    batch = parallel.shard_batch((np.random.default_rng(0).random((GLOBAL_BATCH, 784)) < 0.3).astype(np.float32),
                                 mesh)
    most = 0
    for _ in range(UNWAITED_STEPS):
        state, metrics = step(state, batch)
        most = max(most, len(step._in_flight))
    report["unwaited"] = {"steps": UNWAITED_STEPS, "most_in_flight": most, "limit": runtime.CPU_MAX_IN_FLIGHT,
                          "last_loss": float(metrics["loss"])}
    lap("unwaited")
    print("REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                        " --xla_backend_optimization_level=1").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # tensorflow, if installed, is imported by distrax and only costs start-up time here: keep it out.
    code = ("import sys; sys.modules['tensorflow'] = None; sys.path.insert(0, sys.argv[1]); "
            "import test_parallel; test_parallel._worker()")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))
    result = json.loads(line[len("REPORT "):])
    print("8-device subprocess, seconds per part:", result["seconds"])
    return result


def test_batches_are_split_and_gradients_all_reduced(report):
    assert report["devices"] == 8
    assert report["batch_devices_8"] == 8 and report["batch_shard_rows_8"] == [GLOBAL_BATCH // 8]
    assert report["batch_devices_1"] == 1 and report["batch_shard_rows_1"] == [GLOBAL_BATCH]
    assert report["all_reduce_in_step_8"]
    assert report["params_replicated_8"] and report["params_replicated_1"]


def test_loss_trajectory_same_on_1_and_8_devices(report):
    """Same global batch and key: the 50-step loss trajectories agree within 1e-5 relative (only the order of the
    floating-point sums differs; measured: about 3e-6 at most)."""
    l1, l8 = np.array(report["losses_1"]), np.array(report["losses_8"])
    assert l1.shape == l8.shape == (STEPS,)
    assert l1[-1] < l1[0] - 5.0  # it trains
    rel = np.abs(l8 - l1) / np.abs(l1)
    assert rel.max() < 1e-5, rel.max()
    for a, b in zip(report["params_1"], report["params_8"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_fit_same_on_1_and_8_devices(report):
    h1, h8 = report["fit_history_1"], report["fit_history_8"]
    assert [h["epoch"] for h in h1] == [h["epoch"] for h in h8] == [0, 1, 2]
    for a, b in zip(h1, h8):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)


def test_microbatched_steps_same_on_1_and_8_devices(report):
    """Gradients accumulated over microbatches of 16, each split over the 8 devices (2 rows each): the same losses
    as on one device (1e-5 relative, float sums in another order), and training."""
    l1, l8 = np.array(report["microbatched_losses_1"]), np.array(report["microbatched_losses_8"])
    assert l1.shape == l8.shape == (5,) and np.all(np.isfinite(l1))
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert "microbatches of 12 examples cannot be split evenly over 8 devices" in report.get("microbatch_error_8", "")


def test_importance_sampling_same_on_1_and_8_devices(report):
    """Per-example keys come from the global batch: the estimates agree to float32 rounding. Each log p(x) is a
    logsumexp of log-weights of magnitude ~10-100 (sums over 64 pixels), whose float32 rounding is ~1e-5 absolute;
    XLA partitions the 8-device program's matmuls differently (2 rows per device instead of 16), so the order of
    the sums differs (measured: up to 2.9e-6 absolute on 4 of 45 values, identical on the rest)."""
    for field, values in report["is_1"].items():
        assert len(values) == 45
        np.testing.assert_allclose(report["is_8"][field], values, rtol=1e-5, atol=1e-5, err_msg=field)


# ------------------------------------------------------------------------------------------------------------
# In this process (one device)
# ------------------------------------------------------------------------------------------------------------


def test_many_steps_dispatched_without_waiting(report):
    """200 steps on 8 devices, none waited for: the step keeps at most runtime.CPU_MAX_IN_FLIGHT calls in flight
    (without that limit the subprocess aborted in XLA:CPU's all-reduce and every test of this module failed)."""
    unwaited = report["unwaited"]
    assert unwaited["steps"] == UNWAITED_STEPS
    assert unwaited["most_in_flight"] == unwaited["limit"]
    assert np.isfinite(unwaited["last_loss"]) and unwaited["last_loss"] > 0


def test_mesh_and_batch_checks(assert_one_line):
    mesh = parallel.make_mesh()
    assert parallel.num_shards(mesh) == jax.device_count()
    assert "device" in parallel.describe(mesh)
    with pytest.raises(ValueError, match=r"number of devices must be an integer from 1 to") as err:
        parallel.make_mesh(jax.device_count() + 1)
    assert_one_line(err.value)
    one = parallel.make_mesh(1)
    assert parallel.check_divisible(100, one) == 100
    batch = parallel.shard_batch(np.ones((10, 3), np.float32), one)
    assert batch.sharding.spec == jax.sharding.PartitionSpec("data")


def test_check_divisible_message(assert_one_line):
    class FakeMesh:  # only the axis size matters for the message
        shape = {"data": 8}

    with pytest.raises(ValueError, match=r"batch size 100 cannot be split evenly over 8 devices; use --batch-size 96 "
                                         r"or --batch-size 104, or fewer devices \(--devices\)") as err:
        parallel.check_divisible(100, FakeMesh())  # type: ignore[arg-type]
    assert_one_line(err.value)


def test_log_likelihood_matches_the_one_device_estimator(small_vae, small_vae_params, digits):
    """On one device parallel.log_likelihood gives exactly likelihood.log_likelihood's numbers."""
    from dlvm_jax.likelihood import log_likelihood

    x = digits.x_test[:30]
    a = log_likelihood(small_vae, small_vae_params, x, jax.random.key(4), num_samples=20, chunk_size=10,
                       batch_size=16, progress=False)
    b = parallel.log_likelihood(small_vae, small_vae_params, x, jax.random.key(4), mesh=parallel.make_mesh(1),
                                num_samples=20, chunk_size=10, batch_size=16, progress=False)
    for field in a._fields:
        np.testing.assert_array_equal(np.asarray(getattr(b, field)), np.asarray(getattr(a, field)))
