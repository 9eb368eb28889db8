"""Budgets: how many units each layer loses. Pure functions over per-layer unit scores and sizes.

Every budget returns, per layer, the number of units (elements or blocks) to prune, and the total is exact:
``uniform`` rounds each layer; the others hit round(sparsity x total units) to the unit.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from .errors import ArgumentError, PruneError

BUDGETS = ("uniform", "global", "erk", "lamp", "rate-distortion")


def total_to_prune(n_units: Sequence[int], sparsity: float) -> int:
    """Units to prune in total for a global budget."""
    return round(sparsity * sum(n_units))


def uniform(n_units: Sequence[int], sparsity: float) -> list[int]:
    """Every layer loses the same share, rounded per layer."""
    return [round(sparsity * n) for n in n_units]


def floor_units(n_units: Sequence[int], min_keep: float, unit_size: int) -> list[int]:
    """Per-layer floor in units: `min_keep` weights (an int >= 1) or a share of each layer (a float in [0, 1))."""
    if isinstance(min_keep, bool) or min_keep < 0:
        raise ArgumentError("min_keep", min_keep, "a weight count >= 1 or a share of each layer in [0, 1)")
    if isinstance(min_keep, float) and min_keep < 1:
        return [min(n, math.ceil(min_keep * n)) for n in n_units]
    return [min(n, math.ceil(int(min_keep) / unit_size)) for n in n_units]


def global_threshold(unit_scores: Sequence[torch.Tensor], n_prune: int, floors: Sequence[int] | None = None) -> list[int]:
    """One threshold across layers; each layer keeps at least its floor (Gupta et al. 2022); ties go in layer order."""
    floors = list(floors) if floors is not None else [0] * len(unit_scores)
    prunable = [s.numel() - f for s, f in zip(unit_scores, floors)]
    if n_prune > sum(prunable):
        raise PruneError(
            f"cannot prune {n_prune} units while keeping the per-layer floors: at most {sum(prunable)} are prunable"
        )
    if n_prune == 0:
        return [0] * len(unit_scores)
    candidates = []
    for scores, floor in zip(unit_scores, floors):
        flat = scores.reshape(-1).double()
        if floor:
            # The floor protects each layer's best units: they cannot be chosen.
            flat = flat.clone()
            flat[torch.topk(flat, floor).indices] = math.inf
        candidates.append(flat)
    everything = torch.cat(candidates)
    threshold = torch.kthvalue(everything, n_prune).values
    below = [int((c < threshold).sum()) for c in candidates]
    ties = [int((c == threshold).sum()) for c in candidates]
    remaining = n_prune - sum(below)
    counts = []
    for b, t in zip(below, ties):
        take = min(t, remaining)
        counts.append(b + take)
        remaining -= take
    return counts


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel densities (Evci et al.; Liu et al. 2022): density ~ sum(shape)/prod(shape), capped at 1."""
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, numels)]
    target = density * sum(numels)
    dense: set[int] = set()
    while True:
        sparse_mass = sum(r * n for i, (r, n) in enumerate(zip(raw, numels)) if i not in dense)
        budget = target - sum(numels[i] for i in dense)
        epsilon = budget / sparse_mass if sparse_mass > 0 else 0.0
        over = [i for i in range(len(raw)) if i not in dense and epsilon * raw[i] > 1]
        if not over:
            break
        # Layers that would exceed density 1 become dense and epsilon is solved again for the rest.
        dense.update(over)
    return [1.0 if i in dense else epsilon * raw[i] for i in range(len(raw))]


def apportion(quotas: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Integers close to real quotas that sum exactly to `total`, none above its cap (largest remainder)."""
    counts = [min(cap, math.floor(q)) for q, cap in zip(quotas, caps)]
    short = total - sum(counts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while short > 0:
        progressed = False
        for i in order:
            if short and counts[i] < caps[i]:
                counts[i] += 1
                short -= 1
                progressed = True
        if not progressed:
            raise PruneError(f"cannot place {short} more units: every layer is full")
    return counts


def erk(shapes: Sequence[Sequence[int]], n_units: Sequence[int], unit_size: int, sparsity: float) -> list[int]:
    """Units to prune per layer under ERK, with the kept total exact."""
    densities = erk_densities(shapes, 1.0 - sparsity)
    keep_total = sum(n_units) - total_to_prune(n_units, sparsity)
    keep = apportion([d * n for d, n in zip(densities, n_units)], keep_total, n_units)
    return [n - k for n, k in zip(n_units, keep)]


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP (Lee et al. 2021): w_u^2 / sum of w_v^2 over v at least as large; the layer's largest gets exactly 1."""
    flat = scores.reshape(-1).double() ** 2
    ordered, order = torch.sort(flat, stable=True)
    suffix = torch.flip(torch.cumsum(torch.flip(ordered, [0]), 0), [0])
    lamp_sorted = torch.where(suffix > 0, ordered / suffix, torch.zeros_like(ordered))
    result = torch.empty_like(flat)
    result[order] = lamp_sorted
    return result.reshape(scores.shape)


def lamp(unit_scores: Sequence[torch.Tensor], n_prune: int, floors: Sequence[int] | None = None) -> list[int]:
    """Global selection on LAMP-normalised scores."""
    return global_threshold([lamp_scores(s) for s in unit_scores], n_prune, floors)


# --- Layer-adaptive rate-distortion allocation (Xu et al. 2023) -------------------------------------------------


def rate_distortion_levels(distortion: Sequence[Sequence[float]], cost: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Pick one level per layer minimising the summed distortion with summed cost >= budget (dynamic programming).

    Output distortion is taken as additive over layers (the paper's finding), so the optimum decomposes: dp[c] is the
    least distortion reaching (capped) cost c with the layers seen so far.
    """
    if budget < 0:
        raise ArgumentError("budget", budget, "a non-negative integer")
    if sum(max(c) for c in cost) < budget:
        raise PruneError(f"no choice of levels reaches a cost of {budget}")
    inf = math.inf
    best = [0.0] + [inf] * budget
    choices: list[list[int]] = []
    for layer_d, layer_c in zip(distortion, cost):
        nxt = [inf] * (budget + 1)
        pick = [-1] * (budget + 1)
        for c, value in enumerate(best):
            if value == inf:
                continue
            for level, (d, k) in enumerate(zip(layer_d, layer_c)):
                reached = min(budget, c + k)
                if value + d < nxt[reached]:
                    nxt[reached], pick[reached] = value + d, level * (budget + 1) + c
        choices.append(pick)
        best = nxt
    levels, c = [], budget
    for pick in reversed(choices):
        level, c = divmod(pick[c], budget + 1)
        levels.append(level)
    return levels[::-1]


def brute_force_levels(distortion: Sequence[Sequence[float]], cost: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Reference answer by enumeration (for tests and tiny problems)."""
    best, best_levels = math.inf, None
    for levels in itertools.product(*(range(len(d)) for d in distortion)):
        if sum(cost[i][l] for i, l in enumerate(levels)) < budget:
            continue
        total = sum(distortion[i][l] for i, l in enumerate(levels))
        if total < best:
            best, best_levels = total, list(levels)
    if best_levels is None:
        raise PruneError(f"no choice of levels reaches a cost of {budget}")
    return best_levels


def rate_distortion(
    n_units: Sequence[int],
    sparsity: float,
    distortion_at: Callable[[int, int], float],
    levels: int = 20,
    resolution: int = 2000,
) -> list[int]:
    """Units to prune per layer minimising additive output distortion; the total is exact.

    `distortion_at(layer, n_pruned)` measures the distortion of pruning one layer alone. Costs are quantised to
    `resolution` steps for the DP; the small overshoot this leaves is handed back by the layers whose last step
    was cheapest in distortion per unit.
    """
    n_prune = total_to_prune(n_units, sparsity)
    if n_prune == 0:
        return [0] * len(n_units)
    # Levels 0, 1/levels, ..., 1 of each layer, never the whole layer (a layer with no weight cuts the network).
    grid = [sorted({min(n - 1, round(n * i / levels)) for i in range(levels + 1)}) for n in n_units]
    table = [[distortion_at(layer, k) for k in counts] for layer, counts in enumerate(grid)]
    step = max(1, math.ceil(sum(n_units) / resolution))
    quantised = [[k // step for k in counts] for counts in grid]
    chosen = rate_distortion_levels(table, quantised, n_prune // step)
    counts = [grid[i][level] for i, level in enumerate(chosen)]
    return _settle_to_total(counts, n_prune, n_units, grid, table, chosen)


def _settle_to_total(counts, n_prune, n_units, grid, table, chosen) -> list[int]:
    """Adjust per-layer counts so they sum exactly to n_prune, moving along each layer's distortion curve."""
    counts = list(counts)

    def slope(i: int) -> float:
        lvl = chosen[i]
        lo, hi = max(lvl - 1, 0), min(lvl + 1, len(grid[i]) - 1)
        span = grid[i][hi] - grid[i][lo]
        return (table[i][hi] - table[i][lo]) / span if span else math.inf

    excess = sum(counts) - n_prune
    order = sorted(range(len(counts)), key=slope, reverse=excess > 0)
    for i in order:
        if excess == 0:
            break
        if excess > 0:  # give back units where pruning hurt most per unit
            give = min(excess, counts[i])
            counts[i] -= give
            excess -= give
        else:  # prune more where it hurts least per unit
            take = min(-excess, n_units[i] - counts[i])
            counts[i] += take
            excess += take
    return counts
