"""Helpers the training-time methods share: which weights they act on, picking the lowest entries, validation."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .. import masks as mask_engine
from ..errors import ArgumentError
from ..selection import DEFAULT_TYPES, Target, select


def targets_of(model: nn.Module, types: Any = DEFAULT_TYPES, include: Any = None, ignore: Any = None) -> list[Target]:
    """The weights prunekit.prune would choose with these selection arguments (one entry per tensor)."""
    if not isinstance(model, nn.Module):
        raise ArgumentError("model", type(model).__name__, "a torch.nn.Module")
    return select(model, types=types, include=include, ignore=ignore).targets


def kept_mask(target: Target) -> torch.Tensor:
    """The attached mask of a target (True = kept), or all True when it has none."""
    mask = mask_engine.get_mask(target.module, target.param_name)
    return torch.ones_like(target.weight, dtype=torch.bool) if mask is None else mask


def lowest(values: torch.Tensor, count: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """A bool tensor marking the `count` smallest `values` among the `eligible` entries (ties: lower index first)."""
    flat = values.detach().reshape(-1).to(torch.float64)
    if eligible is not None:
        flat = torch.where(eligible.reshape(-1), flat, torch.full_like(flat, math.inf))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count > 0:
        chosen[torch.argsort(flat, stable=True)[:count]] = True
    return chosen.reshape(values.shape)


def check_real(value: Any, argument: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False, meaning: str = "") -> float:
    """A real number in the interval from low to high (open or closed at each end), else an ArgumentError."""
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    allowed = f"a number in {left}{low:g}, {high:g}{right}" + (f": {meaning}" if meaning else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(argument, value, allowed)
    number = float(value)
    if not math.isfinite(number) and not (number == math.inf and high == math.inf and not high_open):
        raise ArgumentError(argument, value, allowed)
    if number < low or number > high or (low_open and number == low) or (high_open and number == high):
        raise ArgumentError(argument, value, allowed)
    return number


def attach_keeping(target: Target, keep: torch.Tensor) -> None:
    """Attach `keep` as the target's mask, never reviving a weight an earlier mask pruned."""
    mask_engine.attach(target.module, keep & kept_mask(target), target.param_name)


def layer_counts(targets: Iterable[Target], sparsity: float) -> list[int]:
    """Weights to prune per layer at a uniform `sparsity`, rounded per layer as prunekit's uniform budget does."""
    return [round(sparsity * t.weight.numel()) for t in targets]
