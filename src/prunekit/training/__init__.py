"""Pruning during and before training: schedules, callbacks for a plain PyTorch loop, lottery tickets, sparse
model soups, and an adapter for the transformers Trainer (loaded on first use; transformers stays optional)."""

from __future__ import annotations

from typing import Any

from .callbacks import (PRUNE_AT_INIT_METHODS, FitResult, GradualPruning, PruneAtInit, PruningCallback, fit,
                        prune_keeping_masks)
from .lottery import LotteryTicket
from .schedules import cubic_sparsity, imp_density, imp_sparsity
from .soups import average_same_mask, clone_with_masks, sparse_soup_round

__all__ = [
    "PruningCallback", "GradualPruning", "PruneAtInit", "LotteryTicket", "PruningTrainerCallback", "fit", "FitResult",
    "cubic_sparsity", "imp_density", "imp_sparsity", "average_same_mask", "sparse_soup_round", "clone_with_masks",
    "prune_keeping_masks", "PRUNE_AT_INIT_METHODS",
]


def __getattr__(name: str) -> Any:
    if name == "PruningTrainerCallback":
        from .hf_trainer import PruningTrainerCallback

        return PruningTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
