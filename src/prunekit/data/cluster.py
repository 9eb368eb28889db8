"""Spherical k-means over unit-normalised embeddings and nearest-neighbour search among centroids.

Backends: faiss (faiss-cpu, the default when installed: several times faster than scikit-learn's KMeans on this
workload, see the README) or scikit-learn. Centroids are fitted on a seeded sample of at most
`max_points_per_centroid` rows per cluster (faiss' own rule), then every row is assigned chunk by chunk, so the
embeddings are never all in memory at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from .checks import check_choice, check_count
from .embeddings import CHUNK_ROWS, Embeddings, normalize

BACKENDS = ("auto", "faiss", "sklearn")
ASSIGN_ROWS = 16384  # rows per assignment chunk: 16384 x k float32 similarities stay small


@dataclass
class Clustering:
    """k-means on unit vectors: centroids (k, D), each usable row's cluster and cosine similarity to its centroid."""

    centroids: np.ndarray
    labels: np.ndarray  # int64, one per usable row (Embeddings.valid order)
    similarity: np.ndarray  # float32 cosine similarity of each row to its centroid
    backend: str

    @property
    def n_clusters(self) -> int:
        """Number of centroids."""
        return len(self.centroids)

    def sizes(self) -> np.ndarray:
        """Members per cluster."""
        return np.bincount(self.labels, minlength=self.n_clusters)

    def members(self) -> list[np.ndarray]:
        """Row positions of each cluster (ascending)."""
        order = np.argsort(self.labels, kind="stable")
        return np.split(order, np.cumsum(self.sizes())[:-1])


def has_faiss() -> bool:
    """Whether faiss-cpu is importable."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """'auto' -> faiss when installed, else sklearn; 'faiss' without faiss installed is an error naming the fix."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return "faiss" if has_faiss() else "sklearn"
    if backend == "faiss" and not has_faiss():
        raise ArgumentError("backend", backend, "faiss needs faiss-cpu installed (pip install 'prunekit[data]'); "
                            "or choose backend='sklearn'")
    return backend


def _fit_centroids(sample: np.ndarray, k: int, n_iter: int, seed: int, backend: str) -> np.ndarray:
    """Unit-norm centroids fitted on unit-norm rows (spherical k-means)."""
    if backend == "faiss":
        import faiss

        kmeans = faiss.Kmeans(sample.shape[1], k, niter=n_iter, seed=seed, spherical=True, verbose=False,
                              min_points_per_centroid=1,  # small sets are fine: no warning on stderr
                              max_points_per_centroid=len(sample))  # the sample is already drawn
        kmeans.train(np.ascontiguousarray(sample))
        centroids = kmeans.centroids
    else:
        from sklearn.cluster import KMeans

        centroids = KMeans(n_clusters=k, n_init=1, max_iter=n_iter, random_state=seed).fit(sample).cluster_centers_
    return normalize(centroids)


def kmeans(embeddings: Embeddings, n_clusters: int, *, n_iter: int = 20, seed: int = 0, backend: str = "auto",
           max_points_per_centroid: int = 256, progress: bool = True) -> Clustering:
    """Spherical k-means of the usable rows: fit on a seeded sample, then assign every row chunk by chunk."""
    from tqdm import tqdm

    k = check_count(n_clusters, "n_clusters")
    if k > embeddings.n:
        raise ArgumentError("n_clusters", n_clusters, f"at most the number of usable embeddings ({embeddings.n})")
    check_count(n_iter, "n_iter")
    check_count(max_points_per_centroid, "max_points_per_centroid")
    backend = resolve_backend(backend)
    rng = np.random.default_rng(seed)
    n_sample = min(embeddings.n, k * max_points_per_centroid)
    positions = np.sort(rng.choice(embeddings.n, n_sample, replace=False)) if n_sample < embeddings.n \
        else np.arange(embeddings.n)
    sample = normalize(embeddings.rows(positions))
    centroids = _fit_centroids(sample, k, n_iter, seed, backend)
    del sample
    labels = np.empty(embeddings.n, dtype=np.int64)
    similarity = np.empty(embeddings.n, dtype=np.float32)
    bar = tqdm(total=embeddings.n, desc="assigning to clusters", unit="row", file=sys.stderr,
               disable=None if progress else True, leave=False)
    for part, rows in embeddings.chunks(min(CHUNK_ROWS, ASSIGN_ROWS)):
        sims = rows @ centroids.T
        labels[part] = sims.argmax(axis=1)
        similarity[part] = sims[np.arange(len(rows)), labels[part]]
        bar.update(len(rows))
    bar.close()
    return Clustering(centroids=centroids, labels=labels, similarity=similarity, backend=backend)


def nearest_centroids(centroids: np.ndarray, n_neighbors: int, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """For each unit-norm centroid, the cosine similarities and indices of its n_neighbors nearest other centroids."""
    k = len(centroids)
    n_neighbors = min(check_count(n_neighbors, "n_neighbors"), k - 1)
    if n_neighbors < 1:
        raise ArgumentError("n_clusters", k, "at least 2 clusters (distances between centroids are needed)")
    backend = resolve_backend(backend)
    query = np.ascontiguousarray(centroids, dtype=np.float32)
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(query.shape[1])
        index.add(query)
        sims, idx = index.search(query, n_neighbors + 1)
    else:
        from sklearn.neighbors import NearestNeighbors

        distances, idx = NearestNeighbors(n_neighbors=n_neighbors + 1, metric="cosine").fit(query).kneighbors(query)
        sims = 1.0 - distances
    # Drop each centroid itself (normally the first hit; with duplicate centroids it may come later).
    own = idx == np.arange(k)[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return sims[keep].reshape(k, n_neighbors).astype(np.float32), idx[keep].reshape(k, n_neighbors)
