"""Calibration-based structured pruning of transformers language models: FLAP and CFSP-style widths.

Both read activation statistics block by block with the calibration engine (prunekit.calibration.run_blocks),
on the dense model, then remove attention heads and MLP neurons physically through the groups of
prunekit.graph.transformers.

- FLAP (An et al. 2024, Fluctuation-based Adaptive Structured Pruning for Large Language Models), in the order of
  operations of the authors' code (CASIA-IVA-Lab/FLAP, lib/prune.py, `prune_flap`): the metric of an input channel j
  of o_proj / down_proj is Var(X_j) * ||W[:, j]||^2 (WIFV), squared for o_proj; each layer's channel metrics are
  standardised over all of that layer's channels, and a head (a unit) scores the mean of its channels' standardised
  metrics. "AL-AM" compares every unit of the whole model against one threshold sized in parameters, "UL-UM" keeps
  every layer's share uniform; the removed channels' mean contribution W[:, removed] @ mean(X[removed]) is folded
  into the output bias. One deliberate difference: the threshold weighs each unit by the parameters it really
  removes (see `global_keeps_by_cost`), where the reference hard-codes 512/3, LLaMA-7B's head-to-neuron cost.
- CFSP-style (Wang et al. 2024, CFSP: coarse-to-fine activation information): the coarse step gives each block an
  MLP sparsity from its angular importance 1 - cos(x_in, x_out) (blocks that change the residual stream less
  lose more); the fine step ranks neurons by |W| x ||X|| summed over their gate/up rows and down column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from prunekit.errors import ArgumentError, check_sparsity, unknown_choice
from prunekit.graph.groups import DependencyGraph, Group, Member
from prunekit.graph.importance import per_unit, slices
from prunekit.graph.prune import GroupDecision, StructuredResult, removed_units, rounded_keep
from prunekit.graph.surgery import apply_plan, merge_removals, plan_from_removals

FLAP_STRUCTURES = ("AL-AM", "UL-UM")


def unit_costs(model: nn.Module, group: Group) -> torch.Tensor:
    """Parameters removed with each unit (every slice it owns, in every member tensor)."""
    costs = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        tensor = getattr(model.get_submodule(member.module), member.param)
        if not isinstance(tensor, nn.Parameter):
            continue
        per_index = tensor.numel() // tensor.shape[member.dim]
        costs += per_unit(group, member, torch.full((len(member.index),), float(per_index)))
    return costs


def consumer_member(group: Group) -> Member:
    """The member that reads the group's units: o_proj / down_proj input columns."""
    for member in group.members:
        if member.role == "in" and member.param == "weight":
            return member
    raise ArgumentError("group", group.name, "a head or neuron group with a consuming projection")


@dataclass
class ChannelStats:
    """Mean and variance of every input column of one projection, over the calibration tokens."""

    mean: torch.Tensor
    variance: torch.Tensor
    norm_sq: torch.Tensor


def collect_input_stats(model: nn.Module, samples: Sequence[torch.Tensor], layer_names: set[str],
                        progress: bool = True) -> dict[str, ChannelStats]:
    """Input statistics of the named linear layers, one block at a time on the dense model."""
    from prunekit.calibration import run_blocks
    from prunekit.llm import gather_stats

    collected: dict[str, ChannelStats] = {}

    def process(index: int, name: str, block: nn.Module, feed: Any) -> None:
        layers = {n: model.get_submodule(n) for n in layer_names if n.startswith(name + ".")}
        if not layers:
            return
        for layer, stats in gather_stats(feed, layers, hessian=False).items():
            collected[layer] = ChannelStats(stats.mean, stats.variance, stats.column_norm_sq)

    run_blocks(model, samples, process, progress=progress)
    return collected


def flap_channel_metric(model: nn.Module, group: Group, stats: ChannelStats) -> torch.Tensor:
    """FLAP's WIFV metric of each consumer column, Var(X_j) * ||W[:, j]||^2, squared for attention."""
    member = consumer_member(group)
    weight = getattr(model.get_submodule(member.module), member.param)
    column_energy = slices(weight, member).double().pow(2).sum(dim=1)  # ||W[:, j]||^2 for the member's columns
    metric = stats.variance[member.index].double() * column_energy
    # The reference squares the o_proj metric only: lib/prune.py:336 `W_metric = metrics[...](...) ** 2` for
    # 'self_attn.o_proj'; lib/prune.py:351 uses down_proj's as it is.
    return metric.pow(2) if group.kind in ("head", "kv-group") else metric


def standardise(score: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std (unbiased, as torch.std) over one layer's values; a constant score becomes all zeros."""
    std = score.std() if score.numel() > 1 else torch.tensor(0.0, dtype=score.dtype)
    return (score - score.mean()) / std if float(std) > 0 else torch.zeros_like(score)


def flap_scores(model: nn.Module, group: Group, stats: ChannelStats) -> torch.Tensor:
    """FLAP's unit score: the layer's channel metrics standardised over all its channels, then averaged per unit."""
    member = consumer_member(group)
    # Reference order (lib/prune.py:368-376, AL-AM/AL-MM): stack the per-channel metrics, standardise each layer's
    # row `(x - mean(x, 1)) / std(x, 1)`, then `attn_metric.reshape(len(layers), -1, 128).mean(dim=2)` per head.
    # A unit here may hold several heads (one query-head slot of every KV group): the mean runs over its columns.
    channels = standardise(flap_channel_metric(model, group, stats))
    counts = per_unit(group, member, torch.ones(len(member.index), dtype=torch.float64))
    return per_unit(group, member, channels) / counts.clamp(min=1)


def global_keeps_by_cost(groups: Sequence[Group], scores: Sequence[torch.Tensor], costs: Sequence[torch.Tensor],
                         ratio: float, round_to: int) -> list[int]:
    """Remove the lowest-scoring units across all groups until `ratio` of the groups' parameters is gone.

    FLAP's AL-AM threshold, sized in parameters: the reference (lib/prune.py:387-393) sorts all head and neuron scores
    together and weighs each head as 512/3 neurons, the cost ratio of a LLaMA-7B head (4 projections x 128 channels)
    to a neuron (3 projections), whatever the model; here each unit weighs the parameters it really removes
    (`unit_costs`: head size, grouped-query heads whose key/value rows stay, biases), so the removed share is
    `ratio` on any architecture. A group keeps at least one unit (the reference may empty a layer's attention).
    """
    budget = ratio * float(sum(float(c.sum()) for c in costs))
    flat = [(float(s), i, u) for i, score in enumerate(scores) for u, s in enumerate(score.tolist())]
    flat.sort()
    removed = [0] * len(groups)
    spent = 0.0
    for _, group_index, unit in flat:
        if spent >= budget:
            break
        group = groups[group_index]
        if group.size - removed[group_index] <= max(1, group.min_keep):
            continue  # keep at least one unit per group
        removed[group_index] += 1
        spent += float(costs[group_index][unit])
    return [rounded_keep(g.size, g.size - r, round_to, g.min_keep) for g, r in zip(groups, removed)]


@torch.no_grad()
def compensate_bias(model: nn.Module, group: Group, removed: torch.Tensor, stats: ChannelStats) -> None:
    """FLAP's bias compensation: fold the removed inputs' mean contribution into the consumer's bias."""
    member = consumer_member(group)
    layer = model.get_submodule(member.module)
    columns = member.index[torch.isin(member.unit, removed)]
    if len(columns) == 0:
        return
    shift = layer.weight[:, columns].double() @ stats.mean[columns].double()
    old = layer.bias
    bias = torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device) if old is None else old
    # a new Parameter, never an in-place add: a failed check restores the old tensor (see surgery.checked_edit)
    layer.bias = nn.Parameter(bias.detach() + shift.to(bias.dtype), requires_grad=True if old is None else old.requires_grad)


def _check_common(model: nn.Module, samples: Any, ratio: Any, round_to: Any) -> float:
    ratio = check_sparsity(ratio, "ratio")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ArgumentError("round_to", round_to, "a positive integer")
    if not isinstance(samples, (list, tuple)) or not samples:
        raise ArgumentError("samples", type(samples).__name__, "a non-empty list of calibration token id tensors")
    return ratio


def _apply_checked(model: nn.Module, groups: list[Group], scores: list[torch.Tensor], keeps: list[int],
                   stats: dict[str, ChannelStats] | None) -> tuple[dict, list[str]]:
    """Bias compensation, removal and the config flags as one edit, checked by a forward on a few token ids: on
    failure the weights, biases, attributes and config are restored exactly and a ModelError names the module."""
    from prunekit.graph.transformers import checked

    def edit() -> tuple[dict, list[str]]:
        plan = _apply(model, groups, scores, keeps, stats)
        return plan, (declare_biases(model) if stats is not None else [])

    return checked(model, edit)


def _apply(model: nn.Module, groups: list[Group], scores: list[torch.Tensor], keeps: list[int],
           stats: dict[str, ChannelStats] | None) -> dict:
    removals = []
    for group, score, keep in zip(groups, scores, keeps):
        if keep >= group.size:
            continue
        units = removed_units(score, keep)
        if stats is not None:
            compensate_bias(model, group, units, stats[consumer_member(group).module])
        removals.append(group.removed_indices(units))
    if not removals:
        return {}
    plan = plan_from_removals(model, merge_removals(removals))
    apply_plan(model, plan)
    return plan


def declare_biases(model: nn.Module) -> list[str]:
    """After bias compensation: give sibling projections zero biases and set the config flags transformers reads."""
    config = getattr(model, "config", None)
    notes: list[str] = []
    added_attention = added_mlp = False
    for name, module in model.named_modules():
        for kind, names in (("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            children = [module._modules.get(n) for n in names]
            if not all(isinstance(c, nn.Linear) for c in children):
                continue
            if not any(c.bias is not None for c in children) or all(c.bias is not None for c in children):
                continue
            for child in children:
                if child.bias is None:
                    child.bias = nn.Parameter(torch.zeros(child.out_features, dtype=child.weight.dtype))
            added_attention |= kind == "attention"
            added_mlp |= kind == "mlp"
    for flag, added in (("attention_bias", added_attention), ("mlp_bias", added_mlp)):
        if added and config is not None and hasattr(config, flag):
            setattr(config, flag, True)
            notes.append(f"{flag}: True (FLAP's bias compensation)")
        elif added:
            notes.append(f"the config has no {flag} flag: the compensated biases load only through prunekit.load")
    return notes


def flap(
    model: nn.Module,
    samples: Sequence[torch.Tensor],
    ratio: float,
    *,
    structure: str = "AL-AM",
    heads: str = "query",
    bias_compensation: bool = True,
    round_to: int = 1,
    progress: bool = True,
) -> StructuredResult:
    """FLAP: remove `ratio` of the attention and MLP parameters by fluctuation, with bias compensation."""
    from prunekit.graph.transformers import transformers_graph

    ratio = _check_common(model, samples, ratio, round_to)
    if structure not in FLAP_STRUCTURES:
        raise unknown_choice("structure", structure, FLAP_STRUCTURES)
    graph = transformers_graph(model, heads=heads, neurons=True)
    groups = graph.groups
    layers = {consumer_member(g).module for g in groups}
    stats = collect_input_stats(model, samples, layers, progress=progress)
    missing = sorted(layers - set(stats))
    if missing:
        raise ArgumentError("model", type(model).__name__, f"a model whose projections run during calibration; "
                            f"{missing[0]} never saw an input")
    # Standardised per layer inside flap_scores, before the per-head mean; UL-UM ranks each layer by the same scores,
    # which orders heads as the reference's per-layer sum of squared metrics does (an affine map of each layer).
    scores = [flap_scores(model, g, stats[consumer_member(g).module]) for g in groups]
    if structure == "AL-AM":
        costs = [unit_costs(model, g) for g in groups]
        keeps = global_keeps_by_cost(groups, scores, costs, ratio, round_to)
    else:
        keeps = [rounded_keep(g.size, g.size * (1 - ratio), round_to, g.min_keep) for g in groups]
    plan, notes = _apply_checked(model, groups, scores, keeps, stats if bias_compensation else None)
    decisions = [GroupDecision(g.name, g.kind, g.size, k) for g, k in zip(groups, keeps)]
    if notes and decisions:
        decisions[0].notes += notes
    settings = {"method": "flap", "ratio": ratio, "structure": structure, "heads": heads,
                "bias_compensation": bias_compensation, "round_to": round_to, "calibration_samples": len(samples)}
    return StructuredResult(plan, decisions, graph, settings)


# --- CFSP-style: angular importance sets per-block MLP widths -----------------------------------------------------


def angular_sparsities(importance: Sequence[float], ratio: float, cap: float = 0.95) -> list[float]:
    """Per-block sparsities averaging `ratio`, each block's share inversely proportional to its importance.

    Water-filling keeps every value in [0, cap]: blocks that would exceed the cap are pinned there and the rest of
    the budget is spread over the others again.
    """
    values = torch.tensor([max(float(v), 1e-8) for v in importance], dtype=torch.float64)
    weights = 1.0 / values
    total = ratio * len(values)
    result = torch.zeros_like(values)
    free = torch.ones(len(values), dtype=torch.bool)
    for _ in range(len(values)):
        remaining = total - float(result[~free].sum())
        share = weights * free / float((weights * free).sum()) * remaining
        over = free & (share > cap)
        if not over.any():
            result[free] = share[free]
            break
        result[over] = cap
        free &= ~over
    return [float(v) for v in result]


def cfsp_neuron_scores(model: nn.Module, group: Group, stats: dict[str, ChannelStats]) -> torch.Tensor:
    """Fine step: sum of |W| x ||X|| over a neuron's gate/up rows (MLP input norms) and its down column."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        if member.param != "weight":
            continue
        layer = model.get_submodule(member.module)
        column_norm = stats[member.module].norm_sq.sqrt().double()
        if member.role == "in":  # down_proj column j reads neuron j: |W[:, j]| x ||h_j||
            values = slices(layer.weight, member).abs().sum(dim=1) * column_norm[member.index]
        else:  # gate/up row j: sum_k |W[j, k]| x ||x_k||
            values = (slices(layer.weight, member).abs() * column_norm).sum(dim=1)
        total += per_unit(group, member, values)
    return total


def cfsp(
    model: nn.Module,
    samples: Sequence[torch.Tensor],
    ratio: float,
    *,
    round_to: int = 1,
    progress: bool = True,
) -> StructuredResult:
    """CFSP-style MLP pruning: block widths from angular importance, neurons ranked by activation-weighted |W|."""
    from prunekit.graph.transformers import block_influence, transformers_graph

    ratio = _check_common(model, samples, ratio, round_to)
    graph = transformers_graph(model, heads=None, neurons=True)
    groups = graph.groups
    importance = block_influence(model, samples)
    if len(importance) != len(groups):
        raise ArgumentError("model", type(model).__name__, "one MLP per decoder block")
    sparsities = angular_sparsities(importance, ratio)
    layers = {m.module for g in groups for m in g.members if m.param == "weight"}
    stats = collect_input_stats(model, samples, layers, progress=progress)
    scores = [cfsp_neuron_scores(model, g, stats) for g in groups]
    keeps = [rounded_keep(g.size, g.size * (1 - s), round_to, g.min_keep) for g, s in zip(groups, sparsities)]
    plan, _ = _apply_checked(model, groups, scores, keeps, None)
    decisions = [GroupDecision(g.name, g.kind, g.size, k, [f"block angular importance {i:.4f}, sparsity {s:.3f}"])
                 for g, k, i, s in zip(groups, keeps, importance, sparsities)]
    settings = {"method": "cfsp", "ratio": ratio, "round_to": round_to, "calibration_samples": len(samples),
                "block_importance": importance}
    return StructuredResult(plan, decisions, DependencyGraph(groups, graph.barriers), settings)

