"""data.py: embedded datasets, deterministic splits, input validation with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dlvm_jax import data

_DATA_DIR = os.environ.get("DLVM_DATA_DIR")
SHARED_SPIRAL = Path(_DATA_DIR or "missing-data-dir") / "spiral" / "spiral.npy"


def test_make_spiral_shapes_labels_and_determinism():
    x, y = data.make_spiral(5000, seed=0)
    assert x.shape == (5000, 2) and x.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(y), [1000] * 5)  # balanced arms
    x2, y2 = data.make_spiral(5000, seed=0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = data.make_spiral(5000, seed=1)
    assert not np.allclose(x, x3)
    assert np.all(np.isfinite(x))
    # Geometry: every point is close to its arm's circle (radius 0.363 around a centre 0.60 from the origin;
    # radial noise sd 0.025, so 6 sd = 0.15 bounds every one of 5000 points).
    g = data.SPIRAL_GEOMETRY
    phi = np.deg2rad(g["first_angle_deg"] + 72.0 * y)
    centres = g["centre_radius"] * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    dist = np.linalg.norm(x - centres, axis=1)
    assert np.abs(dist - g["circle_radius"]).max() < 6 * g["radial_sd"]
    # Arms differ: the per-arm means are distinct points.
    means = np.stack([x[y == k].mean(0) for k in range(5)])
    assert np.min(np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(5) * 9) > 0.3


def test_make_spiral_small_and_errors(assert_one_line):
    x, y = data.make_spiral(7, seed=3)
    assert x.shape == (7, 2) and sorted(np.bincount(y, minlength=5)) == [1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="make_spiral needs at least 5 points, got 3") as err:
        data.make_spiral(3)
    assert_one_line(err.value)


def test_split_deterministic_and_disjoint():
    x = np.arange(100, dtype=np.float32)[:, None]
    y = np.arange(100)
    a = data.split(x, y, test_fraction=0.2, seed=4)
    b = data.split(x, y, test_fraction=0.2, seed=4)
    c = data.split(x, y, test_fraction=0.2, seed=5)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1])
    x_tr, x_te, y_tr, y_te = a
    assert x_tr.shape == (80, 1) and x_te.shape == (20, 1)
    np.testing.assert_array_equal(x_tr[:, 0], y_tr)  # rows and labels move together
    np.testing.assert_array_equal(x_te[:, 0], y_te)
    assert sorted(np.concatenate([y_tr, y_te]).tolist()) == list(range(100))  # a partition
    assert data.split(x, test_fraction=0.2)[2:] == (None, None)


def test_split_bad_fraction(assert_one_line):
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5") as err:
        data.split(np.zeros((10, 2)), test_fraction=1.5)
    assert_one_line(err.value)


def test_digits(digits):
    assert digits.name == "digits" and digits.data_shape == (64,)
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.x_test.shape[0] == round(1797 * 0.2)
    for x in (digits.x_train, digits.x_test):
        assert x.dtype == np.float32 and x.shape[1] == 64
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.x_train.max() == 1.0  # rescaled by 16, not left in 0..16 or squashed
    assert set(np.unique(digits.y_train)) == set(range(10))
    np.testing.assert_array_equal(data.digits().x_test, digits.x_test)  # deterministic
    # Passes its own validation for the likelihoods it is meant for.
    data.validate(digits.x_train, likelihood="bernoulli", data_shape=(64,))


def test_spiral_dataset():
    ds = data.spiral(num=500, seed=2)
    assert ds.x_train.shape == (400, 2) and ds.x_test.shape == (100, 2) and ds.y_test.shape == (100,)
    assert ds.name == "spiral" and ds.data_shape == (2,)


def test_validate_accepts_and_converts():
    out = data.validate(np.array([[0, 1], [1, 0]], dtype=np.int64))
    assert out.dtype == np.float32 and out.shape == (2, 2)
    assert data.validate(np.array([[True, False]])).dtype == np.float32


@pytest.mark.parametrize("x, kwargs, match", [
    (np.array([[0.1, np.nan], [0.2, 0.3], [np.nan, 1.0]]), {},
     r"data contains NaN in 2 row\(s\) \(first: row 0\); remove or impute them first"),
    (np.array([[0.1, 0.2], [np.inf, 0.3]]), dict(name="train"), r"train contains infinite values in 1 row\(s\)"),
    (np.array([[-0.5, 0.2], [0.3, 2.0]]), dict(likelihood="bernoulli"),
     r"a bernoulli likelihood needs data in \[0, 1\], but its values span \[-0.5, 2\]; rescale the data or use "
     r"--likelihood gaussian"),
    (np.array([[0.5, 1.2]]), dict(likelihood="continuous_bernoulli"),
     r"a continuous_bernoulli likelihood needs data in \[0, 1\]"),
    (np.zeros((3, 8)), dict(data_shape=(28, 28, 1)),
     r"data has examples of shape \(8,\), but the model expects \(28, 28, 1\)"),
    (np.zeros(5), {}, r"data must have shape \(N, \.\.\.\) with one row per example, got shape \(5,\)"),
    (np.zeros((0, 4)), {}, r"data is empty \(shape \(0, 4\)\)"),
    (np.array([["a", "b"]]), {}, r"data must be a numeric array, got dtype <U1"),
])
def test_validate_errors(x, kwargs, match, assert_one_line):
    with pytest.raises(ValueError, match=match) as err:
        data.validate(x, **kwargs)
    assert_one_line(err.value)


def test_validate_gaussian_allows_any_range():
    x = np.array([[-3.0, 5.0]])
    np.testing.assert_array_equal(data.validate(x, likelihood="gaussian"), x.astype(np.float32))


def test_load_npy(tmp_path, assert_one_line):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((4, 2)))
    out = data.load_npy(good)
    assert out.dtype == np.float32 and out.shape == (4, 2)
    with pytest.raises(FileNotFoundError, match="no data file at"):
        data.load_npy(tmp_path / "missing.npy")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"objects\.npy is not a plain numeric \.npy array") as err:
        data.load_npy(pickled)  # never unpickled
    assert_one_line(err.value)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"nan\.npy contains NaN") as err:
        data.load_npy(nan)
    assert_one_line(err.value)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    assert data.data_dir() is None
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.data_dir() == tmp_path
    assert data.data_dir("/elsewhere") == Path("/elsewhere")  # an explicit folder wins


def test_paper_spiral_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="no data folder: pass --data-dir or set DLVM_DATA_DIR"):
        data.paper_spiral()
    with pytest.raises(FileNotFoundError, match="no data file at"):
        data.paper_spiral(tmp_path)


@pytest.mark.skipif(not SHARED_SPIRAL.is_file(), reason="set DLVM_DATA_DIR to a folder holding spiral/spiral.npy")
def test_paper_spiral_from_shared_data():
    x, y = data.paper_spiral()  # found through DLVM_DATA_DIR
    assert x.shape == (5000, 2) and x.dtype == np.float32
    assert y is not None and y.shape == (5000,)
    np.testing.assert_array_equal(np.bincount(y), [991, 979, 1021, 979, 1030])  # counts in shared/data/README.md


def test_standardize_uses_training_statistics():
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(500, 3))
    train[:, 2] = 7.0  # a constant column is left unscaled (no division by zero)
    test = rng.normal(3.0, 2.0, size=(50, 3))
    tr, te = data.standardize(train, test)
    np.testing.assert_allclose(tr[:, :2].mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(tr[:, :2].std(0), 1.0, atol=1e-12)
    np.testing.assert_array_equal(tr[:, 2], 0.0)
    np.testing.assert_allclose(te, (test - train.mean(0)) / np.where(train.std(0) > 0, train.std(0), 1.0))
    assert data.num_batches(10, 3) == 4 and data.num_batches(9, 3) == 3
