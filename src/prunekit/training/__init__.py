"""Pruning during and before training: schedules, callbacks for a plain PyTorch loop, lottery tickets, sparse
model soups, soft and regularised pruning while training (ISS-P, MaskSparsity, PDP, SAP), structured and depth
pruning at initialisation (PreCropping, block dropping), and an adapter for the transformers Trainer (loaded on
first use; transformers stays optional)."""

from __future__ import annotations

from typing import Any

from .callbacks import (PRUNE_AT_INIT_METHODS, FitResult, GradualPruning, PruneAtInit, PruningCallback, fit,
                        prune_keeping_masks)
from .issp import IterativeSoftShrinkage
from .layer_drop import LayerDropAtInit, block_scores
from .lottery import LotteryTicket
from .mask_sparsity import MaskSparsity
from .pdp import PDP, pdp_soft_mask, pdp_threshold
from .precrop import PreCropResult, layer_densities, precrop
from .sap import SAP, SAPRound
from .schedules import cubic_sparsity, imp_density, imp_sparsity
from .soups import average_same_mask, clone_with_masks, sparse_soup_round

__all__ = [
    "PruningCallback", "GradualPruning", "PruneAtInit", "LotteryTicket", "PruningTrainerCallback", "fit", "FitResult",
    "cubic_sparsity", "imp_density", "imp_sparsity", "average_same_mask", "sparse_soup_round", "clone_with_masks",
    "prune_keeping_masks", "PRUNE_AT_INIT_METHODS", "IterativeSoftShrinkage", "MaskSparsity", "PDP", "pdp_soft_mask",
    "pdp_threshold", "SAP", "SAPRound", "precrop", "PreCropResult", "layer_densities", "LayerDropAtInit",
    "block_scores",
]


def __getattr__(name: str) -> Any:
    if name == "PruningTrainerCallback":
        from .hf_trainer import PruningTrainerCallback

        return PruningTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
