"""Delta pruning and merging on single tensors: DARE, TIES, task arithmetic, linear (pure functions).

Every function takes the base tensor and the fine-tuned tensors (or their deltas) and returns a new tensor;
nothing here knows about checkpoints, so each rule is testable against its paper on hand-made tensors.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from ..errors import ArgumentError, unknown_choice

RESCALES = ("paper", "l1", "none")


def check_density(value: object, argument: str = "density") -> float:
    """Validate a density (share of delta entries kept): a number in (0, 1]."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ArgumentError(argument, value, "a number in (0, 1]") from None
    if not 0.0 < number <= 1.0:
        raise ArgumentError(argument, value, "a number in (0, 1] (0 would drop every delta entry)")
    return number


def check_rescale(value: object) -> str:
    """Normalise a rescale setting: 'paper' (1/(1-p)), 'l1' (keep the L1 norm) or 'none'; True means 'paper'."""
    if value is True:
        return "paper"
    if value is False or value is None:
        return "none"
    if value not in RESCALES:
        raise unknown_choice("rescale", value, RESCALES + ("true", "false"))
    return str(value)


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for one (tensor, model) pair, so results do not depend on the order tensors are visited."""
    digest = hashlib.sha256(f"{seed}\0{index}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def drop_mask(shape: Sequence[int], density: float, seed: int) -> torch.Tensor:
    """Bernoulli keep-mask: each entry survives independently with probability `density`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=generator) < density


def rescale_survivors(delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: str) -> torch.Tensor:
    """Zero the dropped entries and rescale the survivors.

    'paper' multiplies by 1/density = 1/(1-p), so E[result] = delta (Yu et al. 2024). 'l1' multiplies by
    ||delta||_1 / ||kept||_1, which keeps this tensor's L1 norm exactly (mergekit's rescale since 2025).
    """
    kept = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype))
    if rescale == "paper":
        return kept / density
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        # Same guard as mergekit: an (almost) empty tensor is returned as masked, not blown up.
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


def dare(delta: torch.Tensor, density: float, seed: int, rescale: str = "paper") -> torch.Tensor:
    """DARE: drop each delta entry with probability p = 1 - density, rescale the survivors."""
    if density >= 1.0:
        return delta.clone()
    return rescale_survivors(delta, drop_mask(delta.shape, density, seed), density, rescale)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top-k entries by |delta| with k = max(1, int(density * numel)), zero the rest."""
    if density >= 1.0 or delta.numel() == 0:
        return delta.clone()
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    # A full descending sort, as mergekit does: fine-tuning deltas hold many equal magnitudes (Adam's first steps
    # move weights by the same amount), and the same order at the threshold makes the two tools agree exactly.
    keep[torch.argsort(flat.abs().float(), descending=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros((), dtype=delta.dtype)).reshape(delta.shape)


def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: the sign of the summed (weighted) deltas per entry; a zero sum elects +1."""
    return torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(weighted_deltas.dtype)


def agreeing(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """Which entries of each model agree with the elected sign (zeros never agree)."""
    positive = weighted_deltas.sum(dim=0) >= 0
    return torch.where(positive, weighted_deltas > 0, weighted_deltas < 0)


def combine(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """base + lambda * (sum_i w_i delta_i [restricted to sign-agreeing entries], divided by the matching weight sum
    when `normalize`: the disjoint mean of TIES)."""
    weighted = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=weighted.dtype).reshape(-1, *([1] * base.dim()))
    weighted.mul_(w)  # in place: the stack is ours, and one fewer copy of every delta stays in memory
    if consensus:
        mask = agreeing(weighted)
        mixed = weighted.mul_(mask).sum(dim=0)
        if normalize:
            divisor = (w * mask).sum(dim=0)
            mixed = mixed / torch.where(divisor == 0, torch.ones((), dtype=divisor.dtype), divisor)
    else:
        mixed = weighted.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            mixed = mixed / torch.where(divisor.abs() < 1e-8, torch.ones((), dtype=divisor.dtype), divisor)
    return base + lam * mixed


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Weighted average of whole models (model soups, Wortsman et al. 2022); `normalize` divides by sum(w)."""
    total = sum(float(w) * t for w, t in zip(weights, tensors))
    if normalize:
        denominator = float(sum(weights))
        if abs(denominator) < 1e-12:
            raise ArgumentError("weight", list(weights), "weights whose sum is not 0 when normalize is true")
        total = total / denominator
    return total
