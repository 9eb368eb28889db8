"""Pruning that also updates the surviving weights (SparseGPT / OBS-style reconstruction)."""

from .sparsegpt import sparsegpt_prune

__all__ = ["sparsegpt_prune"]
