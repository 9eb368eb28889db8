"""Importance of the units of a group: tensors in, one score per unit out (higher = keep).

Each criterion reads the slices a unit owns in every member tensor (a conv's output rows, the BatchNorm entries,
the next layer's input columns) and adds them up per unit, as the group-level criteria of the structured-pruning
literature do.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from prunekit.errors import unknown_choice
from prunekit.graph.groups import Group, Member

GroupScore = Callable[[nn.Module, Group, dict], torch.Tensor]


def member_tensor(model: nn.Module, member: Member) -> torch.Tensor:
    """The parameter or buffer a member slices."""
    module = model.get_submodule(member.module) if member.module else model
    return getattr(module, member.param)


def slices(tensor: torch.Tensor, member: Member) -> torch.Tensor:
    """Rows [n, rest]: the slice at each of the member's indices, flattened."""
    moved = tensor.detach().float().movedim(member.dim, 0)
    return moved.reshape(moved.shape[0], -1)[member.index]


def per_unit(group: Group, member: Member, values: torch.Tensor) -> torch.Tensor:
    """Sum a per-index value into its unit."""
    return torch.zeros(group.size, dtype=torch.float64).index_add_(0, member.unit, values.double())


def slice_power_sums(tensor: torch.Tensor, member: Member, p: int) -> torch.Tensor:
    """Sum of |x|^p over each of the member's slices; reduces in place of copying the slices out (see `slices`)."""
    other = [d for d in range(tensor.dim()) if d != member.dim]
    values = tensor.detach().float()
    sums = torch.linalg.vector_norm(values, ord=p, dim=other).pow(p) if other else values.abs().pow(p)
    return sums[member.index]


def norm_score(model: nn.Module, group: Group, options: dict, p: int = 2) -> torch.Tensor:
    """Group Lp norm: sum over members of the unit's slices' p-th powers, then the p-th root."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        total += per_unit(group, member, slice_power_sums(member_tensor(model, member), member, p))
    return total.pow(1.0 / p)


def l1_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """Group L1 norm (Li et al. 2017, Pruning Filters for Efficient ConvNets, extended to the coupled group)."""
    return norm_score(model, group, options, p=1)


def l2_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """Group L2 norm over every slice the unit owns."""
    return norm_score(model, group, options, p=2)


def bn_scale_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """Network slimming (Liu et al. 2017): |gamma| of the group's BatchNorm layers; L2 norm where there are none."""
    total = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for member in group.members:
        module = model.get_submodule(member.module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and member.param == "weight":
            found = True
            total += per_unit(group, member, slices(module.weight, member).abs().sum(dim=1))
    if not found:
        group.notes.append("no BatchNorm in this group: scored by group L2 norm instead of BN scale")
        return l2_score(model, group, options)
    return total


def random_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """Uniform random scores from the run's seeded generator (the baseline every criterion must beat)."""
    generator = options.setdefault("generator", torch.Generator().manual_seed(int(options.get("seed", 0))))
    return torch.rand(group.size, generator=generator, dtype=torch.float64)


def taylor_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """First-order Taylor (Molchanov et al. 2019): |sum over the unit's parameters of w * dL/dw|.

    Gradients must already be accumulated in `.grad` (the pruner runs the calibration batches first).
    """
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        tensor = member_tensor(model, member)
        if not isinstance(tensor, nn.Parameter) or tensor.grad is None:
            continue  # buffers (running statistics) carry no gradient
        product = slices(tensor * tensor.grad, member).sum(dim=1)
        total += per_unit(group, member, product)
    return total.abs()


def fpgm_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """FPGM (He et al. 2019): distance of each unit's filters to the others; the nearest the geometric median go first.

    Uses the members that produce the unit (role "out"): a unit's vector is its rows there, concatenated.
    """
    parts = []
    for member in group.members:
        if member.role != "out":
            continue
        rows = slices(member_tensor(model, member), member)
        # units may own several rows (heads): sum their squares per unit into one vector per unit by padding order
        order = torch.argsort(member.unit, stable=True)
        counts = torch.bincount(member.unit, minlength=group.size)
        if int(counts.min()) != int(counts.max()):
            continue
        parts.append(rows[order].reshape(group.size, -1))
    if not parts:
        group.notes.append("no producing layer in this group: scored by group L2 norm instead of FPGM")
        return l2_score(model, group, options)
    vectors = torch.cat(parts, dim=1).double()
    return torch.cdist(vectors, vectors).sum(dim=1)


SCORES: dict[str, GroupScore] = {
    "l1": l1_score,
    "l2": l2_score,
    "bn-scale": bn_scale_score,
    "random": random_score,
    "taylor": taylor_score,
    "fpgm": fpgm_score,
}
NEEDS_GRADIENTS = {"taylor"}


def get_score(name: str) -> GroupScore:
    """The group criterion called `name`."""
    if name not in SCORES:
        raise unknown_choice("score", name, SCORES)
    return SCORES[name]


def register_score(name: str, function: GroupScore, needs_gradients: bool = False) -> None:
    """Add a criterion (calibration-based methods register theirs)."""
    SCORES[name] = function
    if needs_gradients:
        NEEDS_GRADIENTS.add(name)


def score_groups(model: nn.Module, groups: list[Group], score: str, options: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """One score vector per group."""
    function = get_score(score)
    options = {} if options is None else options
    return [function(model, group, options) for group in groups]
