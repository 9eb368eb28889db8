"""Wanda and SparseGPT for causal LMs, with uniform or OWL layer allocation (calibration data, no retraining)."""

from __future__ import annotations

from typing import Any

from . import Method, register


# Keywords of prune_causal_lm that only one solver or allocation reads: given to another, they are refused.
SOLVER_ONLY = {"blocksize": "sparsegpt", "dampening": "sparsegpt"}
ALLOCATION_ONLY = {"owl_m": "owl", "owl_lambda": "owl"}
# Set by the runner itself from the method's recipe, never passed through.
FIXED = ("model", "samples", "sparsity", "solver", "pattern", "allocation", "include", "ignore", "apply")


def check_runner_options(method: str, solver: str, allocation: str, options: dict[str, Any]) -> None:
    """Refuse a keyword the method's solver or allocation does not read, naming it and what the method takes."""
    import inspect

    from ..errors import ArgumentError
    from ..llm import prune_causal_lm

    accepted = [name for name in inspect.signature(prune_causal_lm).parameters if name not in FIXED]
    usable = [name for name in accepted if SOLVER_ONLY.get(name, solver) == solver
              and ALLOCATION_ONLY.get(name, allocation) == allocation]
    for name, value in options.items():
        if name in usable:
            continue
        if name in SOLVER_ONLY or name in ALLOCATION_ONLY:
            needs = SOLVER_ONLY.get(name) or ALLOCATION_ONLY[name]
            raise ArgumentError(name, value, f"not given: method {method!r} does not use it (only methods with "
                                f"{needs} do); its keywords are " + ", ".join(usable))
        raise ArgumentError(name, value, f"a keyword method {method!r} reads: " + ", ".join(usable))


def _runner(solver: str, allocation: str, method: str):
    def run(model, *, sparsity=None, pattern="unstructured", include=None, ignore=None, data=None, apply="mask",
            **options: Any):
        from ..errors import ArgumentError
        from ..llm import prune_causal_lm

        check_runner_options(method, solver, allocation, options)
        if data is None:
            raise ArgumentError("data", None, "calibration token sequences: a list of token id tensors "
                                "(see prunekit.calibration.calibration_samples)")
        return prune_causal_lm(model, data, sparsity, solver=solver, pattern=pattern, allocation=allocation,
                               include=include, ignore=ignore, apply=apply, **options)

    return run


register(Method(
    "wanda", "|W| x ||X||_2 per weight, compared within each output row; no weight update",
    "Sun et al. 2024, A Simple and Effective Pruning Approach for Large Language Models",
    score="wanda", budget="uniform", runner=_runner("wanda", "uniform", "wanda"),
))
register(Method(
    "sparsegpt", "OBS mask selection and reconstruction of the survivors, column block by column block",
    "Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    score="sparsegpt", budget="uniform", runner=_runner("sparsegpt", "uniform", "sparsegpt"),
))
register(Method(
    "owl", "Wanda with outlier-weighted layer-wise sparsity (blocks with more outliers keep more)",
    "Yin et al. 2024, Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs",
    score="wanda", budget="owl", runner=_runner("wanda", "owl", "owl"),
))
register(Method(
    "owl-sparsegpt", "SparseGPT with OWL's outlier-weighted layer-wise sparsity",
    "Yin et al. 2024 (OWL) over Frantar & Alistarh 2023 (SparseGPT)",
    score="sparsegpt", budget="owl", runner=_runner("sparsegpt", "owl", "owl-sparsegpt"),
))
