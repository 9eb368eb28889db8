"""Dataset pruning: score examples (EL2N, GraNd, forgetting, prototypes, random), remove semantic duplicates
(SemDeDup), allocate a budget by cluster complexity (density-based pruning), and select the subset to keep.

Every function returns indices into the original rows; embeddings may be memory-mapped .npy files of any size.
"""

from __future__ import annotations

from .cluster import BACKENDS, Clustering, has_faiss, kmeans, nearest_centroids, resolve_backend
from .dbp import DensityResult, allocate_quotas, cluster_complexity, density_based_selection, softmax
from .embeddings import Embeddings, embed_images, embed_texts, load_embeddings, normalize, prepare
from .prototypes import prototype_scores
from .scores import ForgettingTracker, el2n_scores, forgetting_counts, grand_scores, random_scores
from .semdedup import DedupResult, max_earlier_similarity, semdedup
from .subset import class_quotas, read_indices, select, write_indices, write_json

__all__ = [
    "BACKENDS", "Clustering", "has_faiss", "kmeans", "nearest_centroids", "resolve_backend",
    "DensityResult", "allocate_quotas", "cluster_complexity", "density_based_selection", "softmax",
    "Embeddings", "embed_images", "embed_texts", "load_embeddings", "normalize", "prepare",
    "prototype_scores", "ForgettingTracker", "el2n_scores", "forgetting_counts", "grand_scores", "random_scores",
    "DedupResult", "max_earlier_similarity", "semdedup", "class_quotas", "read_indices", "select", "write_indices",
    "write_json",
]
