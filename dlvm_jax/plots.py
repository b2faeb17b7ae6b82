"""Matplotlib figures written to PNG files (Agg backend: no display needed).

* :func:`image_grid`: a grid of images (samples), from flat 64-vectors (8x8 digits), flat 784-vectors
  (28x28), or (28, 28, 1) / (H, W) images.
* :func:`reconstruction_grid`: originals on the top row, their reconstructions below.
* :func:`training_curves`: train loss and test loss / ELBO against the epoch, from the ``fit`` history.
* :func:`scatter`: 2-D data against model samples (for non-image data such as the spiral).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_side(data_shape: Sequence[int]) -> tuple[int, int] | None:
    """(height, width) if examples of ``data_shape`` can be shown as grey-scale images, else None.

    Flat vectors whose length is a perfect square of at least 16 (64 -> 8x8, 784 -> 28x28), (H, W) and
    (H, W, 1) arrays count as images."""
    shape = tuple(int(d) for d in data_shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        return (side, side) if side * side == shape[0] and side >= 4 else None
    if len(shape) == 2:
        return shape
    if len(shape) == 3 and shape[-1] == 1:
        return shape[:2]
    return None


def to_images(x: Any) -> np.ndarray:
    """Array of examples (N, ...) -> grey-scale images (N, H, W); ``ValueError`` if they are not images."""
    x = np.asarray(x, dtype=np.float32)
    hw = image_side(x.shape[1:])
    if hw is None:
        raise ValueError(f"cannot show examples of shape {tuple(x.shape[1:])} as images")
    return x.reshape((x.shape[0],) + hw)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def image_grid(images: Any, path: str | os.PathLike, title: str | None = None, *, ncols: int | None = None,
               row_labels: Sequence[str] | None = None) -> Path:
    """Write ``images`` (N examples of an image shape, see :func:`image_side`) as a grid PNG; values are
    clipped to [0, 1] after scaling by the overall min / max when they fall outside it."""
    imgs = to_images(images)
    n = imgs.shape[0]
    lo, hi = float(imgs.min()), float(imgs.max())
    if lo < 0.0 or hi > 1.0:  # e.g. Gaussian-likelihood data: show on the data's own range
        imgs = (imgs - lo) / max(hi - lo, 1e-8)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.9, nrows * 0.9 + (0.4 if title else 0.0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            ax.imshow(imgs[i], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    if row_labels:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def reconstruction_grid(originals: Any, reconstructions: Any, path: str | os.PathLike,
                        title: str | None = "originals (top) and reconstructions (bottom)") -> Path:
    """Originals on the top row and their reconstructions on the row below, one column per example."""
    a, b = to_images(originals), to_images(reconstructions)
    if a.shape != b.shape:
        raise ValueError(f"originals {a.shape} and reconstructions {b.shape} differ in shape")
    return image_grid(np.concatenate([a, b]), path, title, ncols=a.shape[0], row_labels=["data", "recon."])


def training_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Train loss and test loss against the epoch (left), and the test ELBO (right) when the history has it."""
    has_elbo = any("test_elbo" in h for h in history)
    fig, axes = plt.subplots(1, 2 if has_elbo else 1, figsize=(10 if has_elbo else 5.5, 3.8), squeeze=False)
    ax = axes[0, 0]
    for key, label, style in (("train_loss", "train loss", "-"), ("test_loss", "test loss", "--")):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), style, marker="." if len(pts) < 30 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats per example)")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_elbo:
        ax = axes[0, 1]
        pts = [(h["epoch"], h["test_elbo"]) for h in history if "test_elbo" in h]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, color="C2")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test ELBO (nats per example)")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def scatter(data: Any, samples: Any, path: str | os.PathLike, title: str | None = None, *,
            max_points: int = 5000) -> Path:
    """2-D data (left) and model samples (right) on the same axes limits (the first two columns of (N, D) arrays)."""
    data, samples = np.asarray(data, np.float32), np.asarray(samples, np.float32)
    for name, a in (("data", data), ("samples", samples)):
        if a.ndim != 2 or a.shape[1] < 2:
            raise ValueError(f"scatter needs (N, D >= 2) arrays, got {name} of shape {a.shape}")
    data, samples = data[:max_points, :2], samples[:max_points, :2]
    both = np.concatenate([data, samples])
    lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.3), sharex=True, sharey=True)
    for ax, a, label, color in ((axes[0], data, "data", "C0"), (axes[1], samples, "samples", "C1")):
        ax.scatter(a[:, 0], a[:, 1], s=3, alpha=0.5, color=color)
        ax.set_title(f"{label} (n={a.shape[0]})", fontsize=10)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["image_side", "to_images", "image_grid", "reconstruction_grid", "training_curves", "scatter"]


def cluster_figure(samples_per_cluster: Sequence[Any], data: Any, assignments: Any, path: str | os.PathLike,
                   title: str | None = None, *, grid_size: int = 150) -> Path:
    """The GMVAE figure for 2-D data. Top: density contours (Gaussian KDE) of the decoded samples drawn from each
    cluster, one colour per cluster. Bottom: the data coloured by their most probable cluster."""
    from scipy.stats import gaussian_kde

    data = np.asarray(data)
    assignments = np.asarray(assignments)
    k = len(samples_per_cluster)
    colours = plt.get_cmap("tab10" if k <= 10 else "tab20")(np.arange(k) % (10 if k <= 10 else 20))
    lo = data.min(0) - 0.15 * np.ptp(data, 0)
    hi = data.max(0) + 0.15 * np.ptp(data, 0)
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], grid_size), np.linspace(lo[1], hi[1], grid_size))
    fig, axes = plt.subplots(2, 1, figsize=(5.5, 10), sharex=True, sharey=True)
    for c, samples in enumerate(samples_per_cluster):
        s = np.asarray(samples)[:, :2]
        if s.shape[0] < 3 or np.any(np.std(s, 0) < 1e-9):
            axes[0].scatter(s[:, 0], s[:, 1], s=2, color=colours[c])
            continue
        kde = gaussian_kde(s.T)
        dens = kde(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
        # Levels at quantiles of the density over the samples: the contours enclose ~95/75/50/25% of the mass.
        levels = np.unique(np.percentile(kde(s[:1000].T), [5, 25, 50, 75]))
        axes[0].contour(gx, gy, dens, levels=levels, colors=[colours[c]], linewidths=1.0)
    axes[0].set_title("decoded samples per cluster (KDE contours: 95, 75, 50, 25% of mass)")
    for c in range(k):
        sel = assignments == c
        axes[1].scatter(data[sel, 0], data[sel, 1], s=2, color=colours[c], label=f"cluster {c} ({sel.sum()})")
    axes[1].set_title("data coloured by most probable cluster")
    axes[1].legend(markerscale=5, fontsize=7, loc="best")
    for ax in axes:
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def tile_images(images: Any, nrows: int, ncols: int) -> np.ndarray:
    """``nrows * ncols`` grey-scale images (row-major order; any shape :func:`to_images` accepts) tiled into one
    (nrows * H, ncols * W) array."""
    imgs = to_images(images)
    if imgs.shape[0] != nrows * ncols:
        raise ValueError(f"tile_images needs {nrows} x {ncols} = {nrows * ncols} images, got {imgs.shape[0]}")
    h, w = imgs.shape[1:]
    return imgs.reshape(nrows, ncols, h, w).transpose(0, 2, 1, 3).reshape(nrows * h, ncols * w)


def latent_scatter(z: Any, labels: Any, path: str | os.PathLike, title: str | None = None, *,
                   xlabel: str = "z[0]", ylabel: str = "z[1]") -> Path:
    """2-D latent codes (the first two columns of an (N, D) array) coloured by integer class labels, with a
    colour bar of the classes."""
    z, labels = np.asarray(z, np.float32), np.asarray(labels).astype(int)
    if z.ndim != 2 or z.shape[1] < 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"latent_scatter needs (N, D >= 2) codes and N labels, got {z.shape} and {labels.shape}")
    classes = int(labels.max()) + 1
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20", classes)
    fig, ax = plt.subplots(figsize=(7, 6))
    sc = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap=cmap, vmin=-0.5, vmax=classes - 0.5, s=2, alpha=0.7)
    cbar = fig.colorbar(sc, ax=ax, ticks=np.arange(classes))
    cbar.set_label("label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def manifold_figure(canvas: Any, grid: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """A tiled decoded manifold (from :func:`tile_images`: column j decoded at z[0] = grid[j], row i at
    z[1] = grid[-1 - i], so that up is larger z[1]) with the grid values on the axes."""
    canvas, grid = np.asarray(canvas, np.float32), np.asarray(grid, np.float32)
    n = grid.shape[0]
    h, w = canvas.shape[0] // n, canvas.shape[1] // n
    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    step = max(1, n // 10)
    ax.set_xticks(np.arange(0, n, step) * w + w / 2 - 0.5, [f"{v:.2f}" for v in grid[::step]], rotation=90)
    ax.set_yticks(np.arange(0, n, step) * h + h / 2 - 0.5, [f"{v:.2f}" for v in grid[::-1][::step]])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def curve_with_reference(epochs: Sequence[int], values: Sequence[float], path: str | os.PathLike,
                         reference: dict[int, float] | None = None, title: str | None = None, *,
                         ylabel: str = "test negative ELBO (nats per example)", label: str = "ours",
                         reference_label: str = "reference") -> Path:
    """One metric against the epoch, with reference values (``{epoch: value}``) marked as points."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(list(epochs), list(values), marker="." if len(values) < 60 else None, label=label)
    if reference:
        ep = sorted(reference)
        ax.scatter(ep, [reference[e] for e in ep], marker="x", s=60, color="C3", zorder=3, label=reference_label)
        for e in ep:
            ax.annotate(f"{reference[e]:.2f}", (e, reference[e]), textcoords="offset points", xytext=(4, 6),
                        fontsize=8, color="C3")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


__all__ += ["tile_images", "latent_scatter", "manifold_figure", "curve_with_reference"]
