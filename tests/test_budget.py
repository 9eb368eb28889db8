"""Budget oracles from the papers: global with floor, ERK, LAMP, rate-distortion DP."""

import math
import random

import pytest
import torch

from prunekit import budget
from prunekit.errors import PruneError


def _scores(seed=0, sizes=(50, 300, 1200, 7)):
    g = torch.Generator().manual_seed(seed)
    # Different scales per layer, so a global threshold really does treat layers differently.
    return [torch.rand(n, generator=g) * (i + 1) for i, n in enumerate(sizes)]


def test_global_floor_zero_equals_plain_global():
    scores = _scores()
    n = budget.total_to_prune([s.numel() for s in scores], 0.8)
    plain = budget.global_threshold(scores, n)
    assert budget.global_threshold(scores, n, floors=[0] * 4) == plain
    # plain global: every pruned unit scores no higher than every kept unit, across layers
    pruned_max = max(float(torch.sort(s).values[k - 1]) for s, k in zip(scores, plain) if k)
    kept_min = min(float(torch.sort(s).values[k]) for s, k in zip(scores, plain) if k < s.numel())
    assert pruned_max <= kept_min
    assert sum(plain) == n


def test_global_floor_keeps_at_least_floor_in_every_layer():
    scores = _scores()
    sizes = [s.numel() for s in scores]
    n = budget.total_to_prune(sizes, 0.9)
    floors = budget.floor_units(sizes, 20, unit_size=1)
    counts = budget.global_threshold(scores, n, floors)
    assert sum(counts) == n
    for size, count, floor in zip(sizes, counts, floors):
        assert size - count >= floor
    # without the floor, the small first layer (lowest scale) would fall under it
    plain = budget.global_threshold(scores, n)
    assert sizes[0] - plain[0] < 20


def test_global_floor_that_cannot_be_met_is_an_error():
    scores = _scores(sizes=(10, 10))
    with pytest.raises(PruneError, match="floor"):
        budget.global_threshold(scores, 15, floors=[8, 8])


def test_global_ties_are_exact():
    scores = [torch.zeros(10), torch.zeros(7), torch.ones(5)]
    counts = budget.global_threshold(scores, 12)
    assert sum(counts) == 12 and counts[2] == 0


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_erk_total_exact_and_no_density_above_one(sparsity):
    shapes = [[16, 3, 3, 3], [32, 16, 3, 3], [64, 32, 3, 3], [10, 64], [4, 2]]
    units = [math.prod(s) for s in shapes]
    prune = budget.erk(shapes, units, 1, sparsity)
    kept = [u - p for u, p in zip(units, prune)]
    assert sum(kept) == sum(units) - round(sparsity * sum(units))
    assert all(0 <= k <= u for k, u in zip(kept, units))
    densities = budget.erk_densities(shapes, 1 - sparsity)
    assert max(densities) <= 1.0 + 1e-12
    # the formula: density ~ sum(shape) / prod(shape) among layers that are not capped at 1
    free = [i for i, d in enumerate(densities) if d < 1]
    ratios = [densities[i] / (sum(shapes[i]) / units[i]) for i in free]
    assert max(ratios) == pytest.approx(min(ratios))


def test_erk_caps_small_layers_dense_and_resolves_epsilon():
    shapes = [[4, 2], [512, 512]]
    densities = budget.erk_densities(shapes, 0.5)
    assert densities[0] == 1.0
    assert densities[0] * 8 + densities[1] * 512 * 512 == pytest.approx(0.5 * (8 + 512 * 512))


def test_lamp_max_score_is_one_at_largest_weight():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        w = torch.randn(40, 30, generator=g)
        s = budget.lamp_scores(w.abs())
        assert float(s.max()) == 1.0
        assert int(s.argmax()) == int(w.abs().argmax())
        # definition: score(u) = w_u^2 / sum_{v >= u} w_v^2
        flat = w.abs().reshape(-1).double() ** 2
        u = 17
        assert float(s.reshape(-1)[u]) == pytest.approx(float(flat[u] / flat[flat >= flat[u]].sum()))


def test_dp_equals_brute_force_on_3_layers_4_levels():
    rng = random.Random(0)
    for _ in range(200):
        distortion = [sorted(rng.uniform(0, 10) for _ in range(4)) for _ in range(3)]
        cost = [sorted(rng.sample(range(0, 12), 4)) for _ in range(3)]
        total = rng.randint(0, sum(c[-1] for c in cost))
        dp = budget.rate_distortion_levels(distortion, cost, total)
        bf = budget.brute_force_levels(distortion, cost, total)
        value = lambda lv: sum(distortion[i][l] for i, l in enumerate(lv))
        assert value(dp) == pytest.approx(value(bf))
        assert sum(cost[i][l] for i, l in enumerate(dp)) >= total


def test_rate_distortion_total_is_exact_and_prefers_cheap_layers():
    units = [1000, 1000, 1000]
    weights = [1.0, 5.0, 25.0]  # layer 0 is cheapest to prune
    counts = budget.rate_distortion(units, 0.5, lambda layer, k: weights[layer] * (k / 1000) ** 2)
    assert sum(counts) == 1500
    assert counts[0] > counts[1] > counts[2]


def test_uniform_rounds_per_layer():
    assert budget.uniform([10, 7, 3], 0.5) == [5, 4, 2]


def test_apportion_exact_and_capped():
    counts = budget.apportion([2.5, 2.5, 9.9], 10, [3, 3, 4])
    assert sum(counts) == 10 and counts[2] == 4
