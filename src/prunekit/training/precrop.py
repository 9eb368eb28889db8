"""PreCropping: structured pruning at initialisation (Cai, Hua, Chen, Suh, De Sa & Zhang 2022, Structured Pruning is
All You Need for Pruning CNNs at Initialization).

The paper's finding: the accuracy of a network pruned at initialisation depends on its layer-wise densities, not on
which weights inside a layer go. PreCropping therefore keeps the per-layer decision of a pruning-at-initialisation
method and realises it as channel widths, so the network is built narrower and dense before training (the savings
are real in dense kernels, for training too). Layer densities d_l come from ERK (data-free), SNIP or SynFlow at the
target sparsity. How densities become widths is prunekit's rule: each coupled channel group (prunekit.graph traces
residual adds, concatenations, ...) keeps a share kappa * sqrt(d) of its channels, d the mean density of the layers
producing it, so a layer between two groups keeps about kappa^2 * sqrt(d_in d_out) of its weights; kappa is found
by bisection so that the selected layers keep (1 - sparsity) of their weights as closely as whole channels allow.
PreCropping changes the model's tensors, so run it before building the optimizer (it is a function, not a
callback, for that reason).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..budget import erk_densities
from ..errors import ArgumentError, check_sparsity, unknown_choice
from ..graph.prune import default_graph, plan_for, rounded_keep, select_groups
from ..graph.importance import score_groups
from ..graph.surgery import Plan, apply_plan
from ..graph.trace import build_graph
from ..selection import Target
from .common import targets_of

DENSITY_SOURCES = ("erk", "snip", "synflow")
DENSITY_INPUTS = {"erk": (), "snip": ("data",), "synflow": ("example_inputs",)}  # what each source reads


@dataclass
class PreCropResult:
    """What PreCropping did: layer densities asked for, channel widths chosen, weights before and after."""

    densities: dict[str, float]
    widths: dict[str, tuple[int, int]]  # group name -> (channels before, channels kept)
    weights_before: int
    weights_after: int
    kappa: float
    plan: Plan = field(repr=False, default_factory=dict)

    @property
    def density(self) -> float:
        """Share of the selected layers' weights that remain."""
        return self.weights_after / self.weights_before


def layer_densities(model: nn.Module, sparsity: float, source: str = "erk", *, data: Any = None,
                    example_inputs: Any = None, targets: list[Target] | None = None, **selection: Any
                    ) -> dict[str, float]:
    """Per-layer densities at `sparsity`: ERK from the shapes, or the masks SNIP / SynFlow give (on a copy)."""
    sparsity = check_sparsity(sparsity)
    if source not in DENSITY_SOURCES:
        raise unknown_choice("densities", source, DENSITY_SOURCES)
    for name, value in (("data", data), ("example_inputs", example_inputs)):
        if value is not None and name not in DENSITY_INPUTS[source]:
            raise ArgumentError(name, type(value).__name__, f"None for densities {source!r}, which does not read it "
                                f"(snip reads data, synflow example_inputs, erk neither)")
    targets = targets if targets is not None else targets_of(model, **selection)
    if source == "erk":
        values = erk_densities([tuple(t.weight.shape) for t in targets], 1.0 - sparsity)
        return {t.name: float(v) for t, v in zip(targets, values)}
    from .. import masks as mask_engine
    from ..api import prune

    if source == "snip" and data is None:
        raise ArgumentError("data", None, "batches to compute gradients on", "SNIP densities need data.")
    if source == "synflow" and example_inputs is None:
        raise ArgumentError("example_inputs", None, "an input batch (SynFlow uses only its shape)")
    scratch = copy.deepcopy(model)
    scratch.eval()
    names = [t.name for t in targets]
    prune(scratch, source, sparsity, data=data, example_inputs=example_inputs, include=names)
    found = {name: float(mask.float().mean()) for name, _, _, mask in mask_engine.masked_modules(scratch)}
    return {name: found.get(name, 1.0) for name in names}


def _kept_weights(targets: list[Target], plan: Plan) -> int:
    """How many weights the selected layers hold once `plan` is applied (read from the plan, nothing sliced)."""
    total = 0
    for target in targets:
        shape = list(target.weight.shape)
        for dim in range(len(shape)):
            kept = plan.get((target.name, target.param_name, dim))
            if kept is not None:
                shape[dim] = int(kept.numel())
        total += math.prod(shape)
    return total


def precrop(model: nn.Module, sparsity: float, example_inputs: Any, densities: str = "erk", *, data: Any = None,
            round_to: int = 1, ignore: Any = (), types: Any = ("linear", "conv"), steps: int = 40) -> PreCropResult:
    """Narrow `model` in place at initialisation so its Linear/Conv layers keep about (1 - sparsity) of their
    weights, distributed over layers as the `densities` source (erk, snip or synflow) says."""
    sparsity = check_sparsity(sparsity)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ArgumentError("round_to", round_to, "an integer >= 1 (channel counts are multiples of it)")
    ignore = [ignore] if isinstance(ignore, str) else list(ignore or ())
    targets = targets_of(model, types)
    # the example always drives the trace below; the densities read it only for SynFlow
    wanted = layer_densities(model, sparsity, densities, data=data, targets=targets,
                             example_inputs=example_inputs if densities == "synflow" else None)
    # A model built without transformers ever being imported cannot be one of its models: skip that import.
    graph = default_graph(model, example_inputs) if "transformers" in sys.modules else build_graph(
        model, example_inputs)
    groups, _ = select_groups(graph, ignore)
    if not groups:
        raise ArgumentError("model", type(model).__name__, "a model with prunable channel groups",
                            "The tracer found none (see prunekit shrink --explain).")
    group_density = []
    for group in groups:
        producers = {m.module for m in group.members if m.role == "out" and m.param == "weight"} & wanted.keys()
        group_density.append(sum(wanted[n] for n in producers) / len(producers) if producers else 1.0)
    scores = score_groups(model, groups, "l2")
    before = _kept_weights(targets, {})
    goal = (1.0 - sparsity) * before

    def plan_at(kappa: float) -> Plan:
        keeps = [rounded_keep(g.size, g.size * min(1.0, kappa * math.sqrt(d)), round_to, g.min_keep)
                 for g, d in zip(groups, group_density)]
        return plan_for(model, groups, scores, keeps)

    low, high = 0.0, 1.0 / math.sqrt(max(min(group_density), 1e-12))
    best = (math.inf, high, plan_at(high))
    for _ in range(steps):
        middle = (low + high) / 2
        plan = plan_at(middle)
        kept = _kept_weights(targets, plan)
        best = min(best, (abs(kept - goal), middle, plan), key=lambda item: item[0])
        if kept > goal:
            high = middle
        else:
            low = middle
    _, kappa, plan = best
    widths = {}
    for group in groups:
        out = next((m for m in group.members if m.role == "out"), group.members[0])
        kept = plan.get(out.key)
        widths[group.name] = (group.size, group.size if kept is None else int(kept.numel()))
    with torch.no_grad():
        if plan:
            apply_plan(model, plan)
    after = sum(t.weight.numel() for t in targets_of(model, types))
    return PreCropResult(wanted, widths, before, after, kappa, plan)
