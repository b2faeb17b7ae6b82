"""Datasets, deterministic splits and input validation.

Embedded (no download): scikit-learn's 8x8 digits and a generator of the GMVAE paper's five-arc 'spiral' data.
Files: the paper's own spiral ``.npy`` (any (N, D) float ``.npy`` works the same way).
The data folder is configurable: ``--data-dir`` on the command line or the ``DLVM_DATA_DIR`` environment variable.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATA_DIR_ENV = "DLVM_DATA_DIR"


class Dataset(NamedTuple):
    """Train/test arrays (float32, values as the likelihood needs them) and optional integer labels."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    name: str = ""

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def data_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The data folder: ``path`` if given, else ``$DLVM_DATA_DIR``, else None."""
    if path is not None:
        return Path(path)
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def validate(x: np.ndarray, *, name: str = "data", likelihood: str | None = None,
             data_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Check a data array and return it as float32; raise ``ValueError`` with one line naming the problem."""
    x = np.asarray(x)
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...) with one row per example, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape})")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        kind = "NaN" if np.isnan(x).any() else "infinite values"
        raise ValueError(f"{name} contains {kind} in {rows.size} row(s) (first: row {rows[0]}); "
                         "remove or impute them first")
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"{name} has examples of shape {tuple(x.shape[1:])}, but the model expects "
                         f"{tuple(data_shape)}")
    if likelihood in ("bernoulli", "continuous_bernoulli"):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"a {likelihood} likelihood needs {name} in [0, 1], but its values span "
                             f"[{lo:.4g}, {hi:.4g}]; rescale the data or use --likelihood gaussian")
    return x


def split(x: np.ndarray, y: np.ndarray | None = None, *, test_fraction: float = 0.2,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Deterministic shuffled train/test split (same ``seed`` -> same split)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = x.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    if y is None:
        return x[train], x[test], None, None
    return x[train], x[test], y[train], y[test]


# ------------------------------------------------------------------------------------------------------------
# Embedded data
# ------------------------------------------------------------------------------------------------------------


def digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, flattened to 64 values rescaled to [0, 1] (pixel / 16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    return Dataset(*split(x, y, test_fraction=test_fraction, seed=seed), name="digits")


#: Geometry of the GMVAE paper's spiral data, fitted to the paper's own file (see shared/data/README.md):
#: five circles of radius 0.363 whose centres lie 0.60 from the origin at polar angles 4 + 72k degrees; on
#: each circle the points sit at an angle (from the centre's direction) of 86 +- 32 degrees (normal), with
#: radial noise sd 0.025; equal arm sizes.
SPIRAL_GEOMETRY = {"arms": 5, "centre_radius": 0.60, "first_angle_deg": 4.0, "circle_radius": 0.363,
                   "arc_mean_deg": 86.0, "arc_sd_deg": 32.0, "radial_sd": 0.025}


def make_spiral(num: int = 5000, *, seed: int = 0, arms: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``num`` points of the five-arc spiral data and their arc labels (float32 (num, 2), int32 (num,))."""
    if num < arms:
        raise ValueError(f"make_spiral needs at least {arms} points, got {num}")
    g = SPIRAL_GEOMETRY
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num) % arms).astype(np.int32)
    phi = np.deg2rad(g["first_angle_deg"] + 360.0 / arms * labels)
    centres = g["centre_radius"] * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    theta = phi + np.deg2rad(g["arc_mean_deg"] + g["arc_sd_deg"] * rng.standard_normal(num))
    radius = g["circle_radius"] + g["radial_sd"] * rng.standard_normal(num)
    x = centres + radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return x.astype(np.float32), labels


def spiral(*, num: int = 5000, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The generated five-arc spiral, split into train and test."""
    x, y = make_spiral(num, seed=seed)
    return Dataset(*split(x, y, test_fraction=test_fraction, seed=seed), name="spiral")


def load_npy(path: str | os.PathLike, *, name: str | None = None) -> np.ndarray:
    """Load an (N, D) numeric ``.npy`` file (``allow_pickle`` stays off) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path} is not a plain numeric .npy array ({err})") from None
    return validate(x, name=name or path.name)


def paper_spiral(folder: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The GMVAE paper's spiral file ``spiral/spiral.npy`` under the data folder, with the derived arc labels
    (``spiral/arm_label_derived.npy``) when present."""
    root = data_dir(folder)
    if root is None:
        raise FileNotFoundError(f"no data folder: pass --data-dir or set {DATA_DIR_ENV}")
    x = load_npy(root / "spiral" / "spiral.npy")
    label_path = root / "spiral" / "arm_label_derived.npy"
    y = np.load(label_path, allow_pickle=False).astype(np.int32) if label_path.is_file() else None
    return x, y


def standardize(x_train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centre and scale every array by the training mean and standard deviation (per column)."""
    mean = x_train.mean(0, keepdims=True)
    std = x_train.std(0, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    return tuple((a - mean) / std for a in (x_train,) + others)


def num_batches(num: int, batch_size: int) -> int:
    return math.ceil(num / batch_size)
