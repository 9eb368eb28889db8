"""DAREx-q (Deng et al. 2024): DARE with the rescale 1/(1-p) replaced by 1/q, q tuned on one unlabelled batch.

At high drop rates the paper's 1/(1-p) overshoots; DAREx-q keeps DARE's random mask and picks the q whose pruned
model's outputs are closest to the fine-tuned model's on a batch of inputs (no labels needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ArgumentError, ModelError
from . import ops


@dataclass
class DarexResult:
    """The chosen q and the output distance of every q tried (the paper's q = 1 - p included)."""

    q: float
    density: float
    distances: dict[float, float] = field(default_factory=dict)

    @property
    def paper_distance(self) -> float:
        """Output distance with DARE's own rescale 1/(1-p)."""
        return self.distances[self.density]


def primary_output(output: Any) -> torch.Tensor:
    """The tensor a model's outputs are compared on: logits, else the last hidden state, else the first tensor."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelError(f"cannot compare outputs of type {type(output).__name__}: expected a tensor, a tuple of "
                     "tensors, or an output with logits / last_hidden_state")


def _run(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return primary_output(model(**batch)).float()
    return primary_output(model(batch)).float()


def default_grid(density: float, points: int = 25) -> list[float]:
    """q from density/2 to 1 on a log scale, with the paper's q = density among them."""
    low, high = math.log(density / 2), math.log(1.0)
    grid = {round(math.exp(low + (high - low) * i / (points - 1)), 6) for i in range(points)}
    grid.add(density)
    return sorted(grid)


def darex_q(model: nn.Module, base_state: Mapping[str, torch.Tensor], density: float, batch: Any, *,
            grid: Sequence[float] | None = None, seed: int = 0) -> DarexResult:
    """Prune `model`'s delta from `base_state` with DARE (keep probability `density`), rescale by the tuned 1/q.

    `model` holds the fine-tuned weights and is left holding base + mask * delta / q for the best q.
    """
    density = ops.check_density(density)
    grid = list(grid) if grid is not None else default_grid(density)
    for q in grid:
        if not isinstance(q, (int, float)) or not q > 0:
            raise ArgumentError("grid", q, "positive numbers")
    if density not in grid:
        grid.append(density)
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    missing = sorted(set(params) - set(base_state))
    if missing:
        raise ModelError(f"tensor {missing[0]!r} of the model is missing from base_state")
    model.eval()
    with torch.no_grad():
        reference = _run(model, batch)
        kept: dict[str, torch.Tensor] = {}
        bases: dict[str, torch.Tensor] = {}
        for name, param in params.items():
            base = base_state[name].to(param.dtype)
            if tuple(base.shape) != tuple(param.shape):
                raise ModelError(f"tensor {name!r} has shape {list(param.shape)} in the model but "
                                 f"{list(base.shape)} in base_state")
            delta = param.detach() - base
            keep = ops.drop_mask(delta.shape, density, ops.tensor_seed(seed, name, 0))
            kept[name] = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype))
            bases[name] = base
        distances: dict[float, float] = {}
        for q in sorted(grid):
            for name, param in params.items():
                param.copy_(bases[name] + kept[name] / q)
            distances[float(q)] = float((_run(model, batch) - reference).pow(2).mean())
        best = min(distances, key=lambda q: (distances[q], abs(q - density)))
        for name, param in params.items():
            param.copy_(bases[name] + kept[name] / best)
    return DarexResult(best, density, distances)
