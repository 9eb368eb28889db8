"""SemDeDup (Abbas et al. 2023, SemDeDup: Data-efficient learning at web-scale through semantic deduplication).

k-means on unit-normalised embeddings; inside each cluster, members are ordered from the farthest from the centroid
to the nearest (the reference implementation's keep-hard order) and each gets M = its largest cosine similarity to
an earlier member. A member with M > 1 - eps is a semantic duplicate and is removed: of a group of exact duplicates
exactly one survives, and mutually orthogonal embeddings (M = 0) are all kept. As in the reference code M is taken
over every earlier member, so one pass decides everything and a target size is a threshold on M.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ArgumentError
from .checks import check_fraction, keep_count
from .cluster import Clustering, kmeans
from .embeddings import Embeddings, normalize, prepare

BLOCK_ELEMENTS = 1 << 24  # similarity entries per block (64 MiB of float32), whatever the cluster size


@dataclass
class DedupResult:
    """What SemDeDup kept: indices into the original rows, each row's M, and the threshold used."""

    keep: np.ndarray
    similarity: np.ndarray  # M per original row: max cosine similarity to an earlier member (NaN for dropped rows)
    threshold: float  # rows with M > threshold were removed
    clustering: Clustering
    dropped_nan: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def max_earlier_similarity(x: np.ndarray) -> np.ndarray:
    """For unit rows in order, M_i = max_{j < i} x_i . x_j (-1 for the first), in blocks of bounded memory."""
    n = len(x)
    result = np.full(n, -1.0, dtype=np.float32)
    block = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(1, n, block):
        stop = min(start + block, n)
        sims = x[start:stop] @ x[:stop].T
        later = np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]  # j >= i: not earlier
        sims[later] = -np.inf
        result[start:stop] = np.maximum(sims.max(axis=1), -1.0)
    return result


def cluster_similarity(source: Embeddings, clustering: Clustering, progress: bool = True) -> np.ndarray:
    """M for every usable row (Embeddings.valid order), cluster by cluster."""
    from tqdm import tqdm

    similarity = np.empty(source.n, dtype=np.float32)
    bar = tqdm(total=source.n, desc="SemDeDup", unit="row", file=sys.stderr, disable=None if progress else True,
               leave=False)
    for members in clustering.members():
        if len(members) == 0:
            continue
        order = np.argsort(clustering.similarity[members], kind="stable")  # farthest from the centroid first
        rows = normalize(source.rows(members))[order]  # members are ascending: a sequential read of a memmap
        similarity[members[order]] = max_earlier_similarity(rows)
        bar.update(len(members))
    bar.close()
    return similarity


def semdedup(embeddings: Any, *, eps: float | None = None, keep: float | None = None, n_clusters: int = 100,
             nan_rows: str = "refuse", seed: int = 0, n_iter: int = 20, backend: str = "auto",
             clustering: Clustering | None = None, progress: bool = True) -> DedupResult:
    """Remove semantic duplicates: rows with M > 1 - eps (eps in (0, 1)), or the rows with the largest M so that a
    `keep` share of the usable rows remains. Give exactly one of eps and keep."""
    if (eps is None) == (keep is None):
        raise ArgumentError("eps", eps, "exactly one of eps (a similarity margin) and keep (a share to keep)")
    if eps is not None and not (isinstance(eps, (int, float)) and 0.0 < float(eps) < 1.0):
        raise ArgumentError("eps", eps, "a number in (0, 1): pairs with cosine similarity > 1 - eps are duplicates")
    fraction = check_fraction(keep) if keep is not None else None
    source = prepare(embeddings, nan_rows)
    clusters = clustering or kmeans(source, n_clusters, n_iter=n_iter, seed=seed, backend=backend, progress=progress)
    similarity = cluster_similarity(source, clusters, progress)
    if fraction is None:
        threshold = 1.0 - float(eps)
        kept = np.flatnonzero(similarity <= threshold)
    else:
        kept = np.sort(np.argsort(similarity, kind="stable")[:keep_count(source.n, fraction)])
        threshold = float(similarity[kept].max())
    full = np.full(len(source.array), np.nan)
    full[source.valid] = similarity
    return DedupResult(keep=source.valid[kept], similarity=full, threshold=threshold, clustering=clusters,
                       dropped_nan=source.dropped,
                       info={"usable": source.n, "kept": int(len(kept)), "n_clusters": clusters.n_clusters,
                             "backend": clusters.backend, "threshold": threshold})
