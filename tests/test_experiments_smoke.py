"""Smoke test of experiments/mnist_conv2d.py on a tiny slice of MNIST (skips without ``$DLVM_DATA_DIR``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from dlvm_jax import data
from dlvm_jax.likelihood import log_likelihood
from dlvm_jax.models.vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mnist_dir() -> str:
    root = os.environ.get(data.DATA_DIR_ENV)
    if not root:
        pytest.skip(f"{data.DATA_DIR_ENV} is not set: no MNIST to run the experiment on")
    folder = Path(root) / "mnist"
    if not all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in data.IDX_FILES.values()):
        pytest.skip(f"{folder} does not hold the four MNIST IDX files")
    return root


def test_mnist_conv2d_tiny_run(tmp_path):
    root = _mnist_dir()
    out = tmp_path / "mnist_conv2d.json"
    script = _load("mnist_conv2d")
    assert script.main(["--data-dir", root, "--max-train", "200", "--max-test", "100", "--epochs", "1",
                        "--is-examples", "3", "--is-samples", "8", "--is-batch", "2", "--no-progress",
                        "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["epochs"] == 1 and len(res["test_neg_elbo"]) == 1
    assert all(map(math.isfinite, res["test_neg_elbo"] + [res["test_neg_elbo_epoch0"], res["is_nll"]]))
    assert res["is_examples"] == 3 and res["is_num_samples"] == 8
    # log p(x) >= the ELBO on the same samples, so the IS NLL is at most the mean of -log w
    assert res["is_nll"] <= res["is_neg_elbo_same_samples"] + 1e-4
    assert res["reference"]["test_neg_elbo_epoch20"] == 143.31
    for name in ("latent", "manifold", "curve"):
        assert (tmp_path / f"mnist_conv2d_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mnist_conv2d_missing_data(tmp_path):
    script = _load("mnist_conv2d")
    with pytest.raises(SystemExit, match="MNIST file"):
        script.main(["--data-dir", str(tmp_path), "--epochs", "0", "--out", str(tmp_path / "r.json")])


def test_timed_log_likelihood_equals_log_likelihood():
    """The experiment's timed IS loop reproduces dlvm_jax.likelihood.log_likelihood exactly (same keys, padding)."""
    script = _load("mnist_conv2d")
    model = VAE(VAEConfig(data_shape=(28, 28, 1), latent_dim=2, network="conv"))
    params = model.init(jax.random.key(0))
    x = (np.random.default_rng(0).random((3, 28, 28, 1)) > 0.7).astype(np.float32)
    key = jax.random.key(1)
    ours, first, rest = script.timed_log_likelihood(model, params, x, key, num_samples=8, chunk_size=4,
                                                    batch_size=2, progress=False)
    ref = log_likelihood(model, params, x, key, num_samples=8, chunk_size=4, batch_size=2, progress=False)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert first > 0 and rest >= 0


def test_figure_helpers(tmp_path):
    from dlvm_jax import plots

    imgs = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 2, 3), np.float32)  # image i is all i
    canvas = plots.tile_images(imgs, 2, 3)
    assert canvas.shape == (4, 9)
    assert canvas[0, 0] == 0 and canvas[0, 3] == 1 and canvas[2, 0] == 3 and canvas[3, 8] == 5  # row-major tiles
    with pytest.raises(ValueError, match="2 x 2"):
        plots.tile_images(imgs, 2, 2)
    rng = np.random.default_rng(0)
    png = b"\x89PNG\r\n\x1a\n"
    paths = [plots.latent_scatter(rng.normal(size=(50, 2)), rng.integers(0, 10, 50), tmp_path / "l.png"),
             plots.manifold_figure(np.full((56, 56), 0.5), np.linspace(-1, 1, 2), tmp_path / "m.png"),
             plots.curve_with_reference([1, 2], [3.0, 2.0], tmp_path / "c.png", {1: 2.5})]
    assert all(p.read_bytes()[:8] == png for p in paths)


def test_iwae_table_schedule_is_burdas():
    """Stage i lasts 3^i epochs at 1e-3 * 10^(-i/7); 8 stages make the paper's 3280 epochs."""
    script = _load("iwae_table")
    assert sum(script.stage_epochs()) == script.PAPER_EPOCHS == 3280
    schedule = script.learning_rate(steps_per_epoch=10)
    starts = np.concatenate([[0], np.cumsum(script.stage_epochs())[:-1]]) * 10
    for i, s in enumerate(starts):
        np.testing.assert_allclose(float(schedule(int(s))), 1e-3 * 10 ** (-i / 7), rtol=1e-5)
        np.testing.assert_allclose(float(schedule(int(s) + 10 * 3 ** i - 1)), 1e-3 * 10 ** (-i / 7), rtol=1e-5)


def test_iwae_table_binarizes_each_batch_afresh():
    script = _load("iwae_table")
    seen = []

    def loss(params, batch, key, step):
        seen.append(batch)
        return 0.0, {}

    wrapped = script.dynamically_binarized(loss)
    x = np.full((4000, 3), 0.3, np.float32)
    wrapped(None, x, jax.random.key(0), 0)
    wrapped(None, x, jax.random.key(1), 1)
    a, b = map(np.asarray, seen)
    assert set(np.unique(a)) <= {0.0, 1.0} and abs(a.mean() - 0.3) < 0.02
    assert (a != b).any()


def test_iwae_table_tiny_run(tmp_path):
    root = _mnist_dir()
    out = tmp_path / "iwae_table.json"
    script = _load("iwae_table")
    assert script.main(["--data-dir", root, "--rows", "vae:1,iwae:3", "--epochs", "1", "--max-train", "200",
                        "--max-test", "100", "--is-examples", "20", "--is-samples", "16", "--is-batch", "10", "--no-progress",
                        "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [(r["objective"], r["k"]) for r in res["rows"]] == [("vae", 1), ("iwae", 3)]
    for r in res["rows"]:
        assert r["epochs"] == 1 and r["is_examples"] == 20 and math.isfinite(r["test_nll"])
        # the IS estimate of log p(x) is at least the ELBO on the same samples
        assert -r["test_nll"] >= r["test_elbo_k5000_mean"] - 1e-4
    assert res["rows"][0]["paper_nll"] == 86.76
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="bad row"):
        script.main(["--data-dir", root, "--rows", "iwae5", "--out", str(out)])


def test_mnist_gmvae_tiny_run_resume_and_baselines(tmp_path):
    """The GMVAE clustering script on 300 images: writes a record per run, --resume keeps finished runs and adds
    the missing seeds, --no-gmvae --baselines adds the raw-pixel baselines without touching the runs."""
    root = _mnist_dir()
    out, ckpt = tmp_path / "mnist_gmvae.json", tmp_path / "ckpt"
    script = _load("mnist_gmvae")
    common = ["--data-dir", root, "--clusters", "3", "--epochs", "2", "--batch-size", "100", "--hidden", "16,8",
              "--prior-hidden", "8", "--local-dim", "4", "--global-dim", "3", "--max-train", "300", "--max-test", "200", "--no-progress",
              "--pretrain-epochs", "2", "--out", str(out), "--checkpoint-dir", str(ckpt)]
    assert script.main(common + ["--seeds", "1"]) == 0
    first = json.loads(out.read_text())["runs"]["3"]
    assert [r["seed"] for r in first] == [0] and first[0]["epochs"] == 2
    assert 1 <= first[0]["clusters_used"] <= 3 and 0.0 <= first[0]["nmi"] <= 1.0
    assert 1 <= first[0]["final"]["test_clusters_used"] <= 3  # the label-free collapse check of each evaluation
    assert first[0]["accuracy_many_to_one"] >= first[0]["accuracy_hungarian"] - 1e-9  # many-to-one is the looser
    # the default recipe starts from a pretrained autoencoder and a mixture fitted to its latents, scored too
    assert json.loads(out.read_text())["config"]["init"] == "pretrain"
    assert 0.0 <= first[0]["at_init"]["accuracy_many_to_one"] <= 1.0 and first[0]["pretrain_loss"] > 0
    assert (ckpt / "K3_seed0").is_dir()
    assert (tmp_path / "mnist_gmvae_K3_seed0_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert script.main(common + ["--seeds", "2", "--resume"]) == 0
    second = json.loads(out.read_text())["runs"]["3"]
    assert [r["seed"] for r in second] == [0, 1] and second[0] == first[0]  # seed 0 kept as it was
    assert script.main(common + ["--seeds", "2", "--no-gmvae", "--baselines"]) == 0
    res = json.loads(out.read_text())
    assert res["runs"]["3"] == second and set(res["baselines"]["3"]) == {"kmeans", "gaussian_mixture"}
    assert len(res["baselines"]["3"]["kmeans"]) == 2
    with pytest.raises(SystemExit, match="different setting"):
        script.main(common + ["--seeds", "2", "--resume", "--epochs", "3"])
    with pytest.raises(SystemExit):  # pretrained inits are not vmapped restarts
        script.main(common + ["--seeds", "2", "--parallel-seeds", "--out", str(tmp_path / "other.json")])


def test_mnist_gmvae_paper_recipe_keeps_baselines(tmp_path):
    """A new setting (the paper recipe) without --resume starts the runs afresh and keeps the raw-pixel baselines
    already in the file (they do not depend on it)."""
    root = _mnist_dir()
    out = tmp_path / "mnist_gmvae.json"
    second_baselines = {"kmeans": [{"accuracy_hungarian": 0.5, "accuracy_many_to_one": 0.6, "nmi": 0.4}]}
    out.write_text(json.dumps({"runs": {"3": [{"seed": 0, "epochs": 2}]}, "baselines": {"3": second_baselines}}))
    script = _load("mnist_gmvae")
    assert script.main(["--data-dir", root, "--clusters", "3", "--batch-size", "100", "--hidden", "16,8",
                        "--prior-hidden", "8", "--local-dim", "4", "--global-dim", "3", "--max-train", "300",
                        "--max-test", "200", "--no-progress", "--out", str(out), "--seeds", "1", "--epochs", "1",
                        "--recipe", "paper", "--cluster-gradient", "elbo", "--no-batch-norm"]) == 0
    res = json.loads(out.read_text())
    assert [r["epochs"] for r in res["runs"]["3"]] == [1] and res["baselines"]["3"] == second_baselines
    assert res["config"]["cluster_gradient"] == "elbo" and res["config"]["batch_norm"] is False
    assert res["config"]["init"] == "random" and "at_init" not in res["runs"]["3"][0]
