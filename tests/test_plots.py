"""Figures: shapes accepted, PNG files written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlvm_jax import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape, side", [((64,), (8, 8)), ((784,), (28, 28)), ((28, 28, 1), (28, 28)),
                                         ((28, 28), (28, 28)), ((2,), None), ((10,), None), ((28, 28, 3), None)])
def test_image_side(shape: tuple[int, ...], side: tuple[int, int] | None) -> None:
    assert plots.image_side(shape) == side


@pytest.mark.parametrize("shape", [(5, 64), (5, 784), (5, 28, 28, 1)])
def test_image_grid_and_reconstructions(shape: tuple[int, ...], tmp_path: Path) -> None:
    x = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    assert plots.image_grid(x, tmp_path / "g.png", "samples").read_bytes()[:8] == PNG
    assert plots.reconstruction_grid(x, 1 - x, tmp_path / "r.png").read_bytes()[:8] == PNG
    assert plots.to_images(x).shape == (5,) + plots.image_side(shape[1:])


def test_image_grid_rejects_non_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images"):
        plots.image_grid(np.zeros((4, 2)), tmp_path / "g.png")


def test_training_curves_and_scatter(tmp_path: Path) -> None:
    history = [{"epoch": 0, "test_loss": 3.0, "test_elbo": -3.0}] + [
        {"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.5 / e, "test_elbo": -2.5 / e} for e in range(1, 6)]
    assert plots.training_curves(history, tmp_path / "c.png").read_bytes()[:8] == PNG
    rng = np.random.default_rng(0)
    assert plots.scatter(rng.normal(size=(100, 2)), rng.normal(size=(50, 2)),
                         tmp_path / "s.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError):
        plots.scatter(np.zeros((10, 1)), np.zeros((10, 1)), tmp_path / "bad.png")
