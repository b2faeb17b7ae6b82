"""Clustering scores: one-to-one (Hungarian) and many-to-one accuracy, NMI, ARI."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _check(labels: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    clusters = np.asarray(clusters).astype(np.int64).reshape(-1)
    if labels.shape != clusters.shape:
        raise ValueError(f"labels and cluster assignments differ in length: {labels.size} vs {clusters.size}")
    if labels.size == 0:
        raise ValueError("no labels to score")
    return labels, clusters


def contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Counts table: rows clusters, columns labels (both relabelled to 0..n-1)."""
    labels, clusters = _check(labels, clusters)
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    table = np.zeros((ci.max() + 1, li.max() + 1), dtype=np.int64)
    np.add.at(table, (ci, li), 1)
    return table


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Best one-to-one matching of clusters to labels (unmatched clusters count as errors)."""
    table = contingency(labels, clusters)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / table.sum())


def many_to_one_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Each cluster takes its most frequent label (the GMVAE paper's score); never below Hungarian accuracy."""
    table = contingency(labels, clusters)
    return float(table.max(axis=1).sum() / table.sum())


def nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    labels, clusters = _check(labels, clusters)
    return float(normalized_mutual_info_score(labels, clusters))


def ari(labels: np.ndarray, clusters: np.ndarray) -> float:
    labels, clusters = _check(labels, clusters)
    return float(adjusted_rand_score(labels, clusters))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """All scores at once, plus the number of clusters actually used."""
    return {
        "accuracy": hungarian_accuracy(labels, clusters),
        "accuracy_many_to_one": many_to_one_accuracy(labels, clusters),
        "nmi": nmi(labels, clusters),
        "ari": ari(labels, clusters),
        "clusters_used": int(np.unique(np.asarray(clusters)).size),
    }
