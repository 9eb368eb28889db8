"""Density-based pruning (Abbas et al. 2024, Effective pruning of web-scale datasets based on complexity of concept
clusters). k-means on unit-normalised embeddings; each cluster's complexity C = d_inter * d_intra, where d_intra is
the mean cosine distance of its members to the centroid and d_inter the mean cosine distance of its centroid to the
n_neighbors nearest other centroids. softmax(C / tau) (tau = 0.5) shares the target size among clusters (a cluster
never gets more than it holds; the excess goes to the others); inside each cluster the hardest members (farthest
from the centroid) are kept. Optionally SemDeDup runs first, as in the paper's pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ArgumentError
from .checks import HARDNESS, check_choice, check_count, check_fraction, check_positive, keep_count
from .cluster import Clustering, kmeans, nearest_centroids
from .embeddings import prepare
from .semdedup import cluster_similarity

DEFAULT_TAU = 0.5
DEFAULT_NEIGHBORS = 20


@dataclass
class DensityResult:
    """What density-based pruning kept, and the per-cluster numbers behind it."""

    keep: np.ndarray  # indices into the original rows
    quotas: np.ndarray  # kept per cluster
    sizes: np.ndarray  # candidates per cluster (after SemDeDup, if it ran)
    d_intra: np.ndarray
    d_inter: np.ndarray
    complexity: np.ndarray
    clustering: Clustering
    dropped_nan: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def softmax(values: np.ndarray, tau: float) -> np.ndarray:
    """softmax(values / tau), computed stably."""
    z = np.asarray(values, dtype=np.float64) / tau
    z = np.exp(z - z.max())
    return z / z.sum()


def allocate_quotas(weights: Any, sizes: Any, target: int) -> np.ndarray:
    """Integer quotas proportional to weights, each at most its cluster's size, summing exactly to target.

    Clusters whose proportional share exceeds their size keep everything and the rest is shared again among the
    others (water-filling); the leftover units after flooring go to the largest remainders.
    """
    w = np.asarray(weights, dtype=np.float64)
    size = np.asarray(sizes, dtype=np.int64)
    if w.shape != size.shape or w.ndim != 1:
        raise ArgumentError("weights", f"shape {w.shape}", f"one weight per cluster (sizes has shape {size.shape})")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ArgumentError("weights", "negative or non-finite weights", "finite weights >= 0")
    if not 0 <= target <= int(size.sum()):
        raise ArgumentError("target", target, f"a count in 0..{int(size.sum())} (the clusters' total size)")
    exact = np.zeros(len(w))
    active = size > 0
    remaining = float(target)
    while active.any() and remaining > 0:
        total = w[active].sum()
        share = np.where(active, remaining * (w / total if total > 0 else active / active.sum()), 0.0)
        full = active & (share >= size)
        if not full.any():
            exact[active] = share[active]
            break
        exact[full] = size[full]
        remaining -= float(size[full].sum())
        active &= ~full
    quotas = np.minimum(np.floor(exact + 1e-9).astype(np.int64), size)
    spare = target - int(quotas.sum())
    for i in np.argsort(-(exact - quotas), kind="stable"):
        if spare <= 0:
            break
        if quotas[i] < size[i]:
            quotas[i] += 1
            spare -= 1
    if spare > 0:  # rounding left units with no remainder: give them wherever there is room
        for i in np.flatnonzero(quotas < size):
            take = min(spare, int(size[i] - quotas[i]))
            quotas[i] += take
            spare -= take
            if spare == 0:
                break
    return quotas


def cluster_complexity(clustering: Clustering, members: list[np.ndarray], n_neighbors: int = DEFAULT_NEIGHBORS,
                       backend: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d_intra, d_inter, C = d_inter * d_intra) per cluster, cosine distances; `members` are the rows that count."""
    d_intra = np.array([float(np.mean(1.0 - clustering.similarity[m])) if len(m) else 0.0 for m in members])
    sims, _ = nearest_centroids(clustering.centroids, n_neighbors, backend)
    d_inter = (1.0 - sims.astype(np.float64)).mean(axis=1)
    return d_intra, d_inter, d_inter * d_intra


def density_based_selection(embeddings: Any, keep: float, *, n_clusters: int = 100, tau: float = DEFAULT_TAU,
                            n_neighbors: int = DEFAULT_NEIGHBORS, hardness: str = "hard",
                            dedup_eps: float | None = None, nan_rows: str = "refuse", seed: int = 0,
                            n_iter: int = 20, backend: str = "auto", clustering: Clustering | None = None,
                            progress: bool = True) -> DensityResult:
    """Keep a `keep` share of the usable rows, allocated to clusters by softmax(complexity / tau)."""
    fraction = check_fraction(keep)
    tau = check_positive(tau, "tau")
    check_count(n_neighbors, "n_neighbors")
    check_choice(hardness, "hardness", HARDNESS)
    if dedup_eps is not None and not (isinstance(dedup_eps, (int, float)) and 0.0 < float(dedup_eps) < 1.0):
        raise ArgumentError("dedup_eps", dedup_eps, "a number in (0, 1), or None for no SemDeDup step")
    source = prepare(embeddings, nan_rows)
    if clustering is None and check_count(n_clusters, "n_clusters") < 2:
        raise ArgumentError("n_clusters", n_clusters, "at least 2 (d_inter needs other centroids)")
    clusters = clustering or kmeans(source, n_clusters, n_iter=n_iter, seed=seed, backend=backend, progress=progress)
    members = clusters.members()
    removed_as_duplicates = 0
    if dedup_eps is not None:
        duplicate = cluster_similarity(source, clusters, progress) > 1.0 - float(dedup_eps)
        removed_as_duplicates = int(duplicate.sum())
        members = [m[~duplicate[m]] for m in members]
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    d_intra, d_inter, complexity = cluster_complexity(clusters, members, n_neighbors, clusters.backend)
    target = min(keep_count(source.n, fraction), int(sizes.sum()))
    quotas = allocate_quotas(softmax(complexity, tau), sizes, target)
    kept = []
    for m, quota in zip(members, quotas):
        if quota:
            order = np.argsort(clusters.similarity[m] if hardness == "hard" else -clusters.similarity[m],
                               kind="stable")  # hard: least similar to the centroid first
            kept.append(m[order[:quota]])
    positions = np.sort(np.concatenate(kept)) if kept else np.empty(0, dtype=np.int64)
    return DensityResult(
        keep=source.valid[positions], quotas=quotas, sizes=sizes, d_intra=d_intra, d_inter=d_inter,
        complexity=complexity, clustering=clusters, dropped_nan=source.dropped,
        info={"usable": source.n, "target": target, "kept": int(len(positions)), "n_clusters": clusters.n_clusters,
              "tau": tau, "n_neighbors": min(n_neighbors, clusters.n_clusters - 1), "backend": clusters.backend,
              "removed_as_duplicates": removed_as_duplicates},
    )
