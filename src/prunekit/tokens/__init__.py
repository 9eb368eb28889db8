"""Token reduction in encoders: ToMe merging and Zero-TPrune pruning, applied by patching layer forwards."""

from .merge import Reduction, apply_reduction
from .patch import METHODS, TokenPatch, patch, patched, unpatch
from .tome import bipartite_soft_matching, max_merges
from .zero_tprune import aggregate_heads, max_prunes, weighted_pagerank, zero_tprune_select

__all__ = [
    "METHODS", "Reduction", "TokenPatch", "aggregate_heads", "apply_reduction", "bipartite_soft_matching",
    "max_merges", "max_prunes", "patch", "patched", "unpatch", "weighted_pagerank", "zero_tprune_select",
]
