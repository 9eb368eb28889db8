"""Wanda and SparseGPT for causal LMs, with uniform or OWL layer allocation (calibration data, no retraining)."""

from __future__ import annotations

from typing import Any

from . import Method, register


def _runner(solver: str, allocation: str):
    def run(model, *, sparsity=None, pattern="unstructured", include=None, ignore=None, data=None, seed=0,
            apply="mask", **options: Any):
        from ..errors import ArgumentError
        from ..llm import prune_causal_lm

        if data is None:
            raise ArgumentError("data", None, "calibration token sequences: a list of token id tensors "
                                "(see prunekit.calibration.calibration_samples)")
        return prune_causal_lm(model, data, sparsity, solver=solver, pattern=pattern, allocation=allocation,
                               include=include, ignore=ignore, apply=apply, **options)

    return run


register(Method(
    "wanda", "|W| x ||X||_2 per weight, compared within each output row; no weight update",
    "Sun et al. 2024, A Simple and Effective Pruning Approach for Large Language Models",
    score="wanda", budget="uniform", runner=_runner("wanda", "uniform"),
))
register(Method(
    "sparsegpt", "OBS mask selection and reconstruction of the survivors, column block by column block",
    "Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    score="sparsegpt", budget="uniform", runner=_runner("sparsegpt", "uniform"),
))
register(Method(
    "owl", "Wanda with outlier-weighted layer-wise sparsity (blocks with more outliers keep more)",
    "Yin et al. 2024, Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs",
    score="wanda", budget="owl", runner=_runner("wanda", "owl"),
))
register(Method(
    "owl-sparsegpt", "SparseGPT with OWL's outlier-weighted layer-wise sparsity",
    "Yin et al. 2024 (OWL) over Frantar & Alistarh 2023 (SparseGPT)",
    score="sparsegpt", budget="owl", runner=_runner("sparsegpt", "owl"),
))
