"""Self-supervised prototype scores (Sorscher et al. 2022, Beyond neural scaling laws): k-means on unit-normalised
embeddings; an example's score is its cosine distance to the nearest centroid. Far from every prototype = hard.
Keep hard examples when data is plentiful, easy ones when it is scarce (the paper's main finding)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .cluster import Clustering, kmeans
from .embeddings import prepare


def prototype_scores(embeddings: Any, n_clusters: int, *, nan_rows: str = "refuse", seed: int = 0, n_iter: int = 20,
                     backend: str = "auto", clustering: Clustering | None = None, progress: bool = True) -> np.ndarray:
    """1 - cos(x, nearest centroid) per row (NaN for rows dropped with nan_rows='drop'); invariant to embedding scale.

    Pass `clustering` (from prunekit.data.kmeans on the same prepared embeddings) to reuse one k-means.
    """
    source = prepare(embeddings, nan_rows)
    clusters = clustering or kmeans(source, n_clusters, n_iter=n_iter, seed=seed, backend=backend, progress=progress)
    scores = np.full(len(source.array), np.nan)
    scores[source.valid] = 1.0 - clusters.similarity.astype(np.float64)
    return scores
