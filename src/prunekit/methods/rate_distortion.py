"""Distortion measurements for the layer-adaptive rate-distortion budget (Xu et al. 2023).

The budget itself (dynamic programming over per-layer levels) lives in prunekit.budget; this measures how much the
model output moves when one layer alone loses its k lowest-scoring units.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..patterns import Pattern
from ..scores.context import ScoreContext, logits_of
from ..selection import Target


def _probe_inputs(context: ScoreContext):
    if context.example_inputs is not None:
        return context.example_inputs
    if context.data is None:
        return None
    batch = next(iter(context.batches()))
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if k != "labels"}
    return batch[0]


def _forward(model: torch.nn.Module, inputs) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(inputs, dict):
        return logits_of(model(**{k: v.to(device) for k, v in inputs.items()})).float()
    return logits_of(model(inputs.to(device))).float()


def distortion_probe(
    context: ScoreContext, targets: list[Target], unit_scores: list[torch.Tensor], pattern: Pattern
) -> Callable[[int, int], float]:
    """A function (layer, units pruned) -> distortion: output MSE on a batch, or removed score energy without data."""
    inputs = _probe_inputs(context)
    if inputs is None:
        # Data-free proxy: the squared score mass removed (for magnitude scores, the weights' energy).
        energy = [torch.cumsum(torch.sort(s.double() ** 2).values, 0) for s in unit_scores]
        return lambda layer, k: float(energy[layer][k - 1]) if k else 0.0

    model = context.model
    with torch.no_grad():
        reference = _forward(model, inputs)

    @torch.no_grad()
    def measure(layer: int, k: int) -> float:
        if k == 0:
            return 0.0
        target = targets[layer]
        weight = target.weight
        saved = weight.detach().clone()
        try:
            keep = pattern.units_mask(unit_scores[layer], weight.shape, target.kind, k)
            weight.masked_fill_(~keep, 0)
            return float(((_forward(model, inputs) - reference) ** 2).mean())
        finally:
            weight.copy_(saved)

    return measure
