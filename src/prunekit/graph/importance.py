"""Importance of the units of a group: tensors in, one score per unit out (higher = keep).

Each criterion reads the slices a unit owns in every member tensor (a conv's output rows, the BatchNorm entries,
the next layer's input columns) and adds them up per unit, as the group-level criteria of the structured-pruning
literature do.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from prunekit.errors import ArgumentError, unknown_choice
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
    """Network slimming (Liu et al. 2017): |gamma| of the group's BatchNorm layers; a group without one is refused,
    or scored by options["fallback"] (l1/l2) when the caller asked for that, with a note."""
    total = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for member in group.members:
        module = model.get_submodule(member.module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and member.param == "weight":
            found = True
            total += per_unit(group, member, slices(module.weight, member).abs().sum(dim=1))
    if not found:
        return fallback_score(model, group, options, "bn-scale", "it has no BatchNorm")
    return total


FALLBACKS = ("l1", "l2")


def fallback_score(model: nn.Module, group: Group, options: dict, score: str, why: str) -> torch.Tensor:
    """The substitute score the caller opted into with options["fallback"], noted on the group; else a clear error."""
    fallback = options.get("fallback")
    if fallback is None:
        raise ArgumentError("score", score, f"a score that applies to every group: group {group.name!r} cannot be "
                            f"scored by {score} ({why})", f"Pass fallback='l2' (CLI: --fallback l2) to score such "
                            "groups by their group norm instead; the result's notes list them")
    if fallback not in FALLBACKS:
        raise unknown_choice("fallback", fallback, FALLBACKS)
    group.notes.append(f"{why}: scored by group {fallback.upper()} norm instead of {score} (fallback={fallback!r})")
    return norm_score(model, group, options, p=1 if fallback == "l1" else 2)


def random_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """Uniform random scores from the run's seeded generator (the baseline every criterion must beat)."""
    generator = options.setdefault("generator", torch.Generator().manual_seed(int(options.get("seed", 0))))
    return torch.rand(group.size, generator=generator, dtype=torch.float64)


def parameter_key(member: Member) -> str:
    """The qualified name of the tensor a member slices ("layer1.0.conv1.weight")."""
    return f"{member.module}.{member.param}" if member.module else member.param


def taylor_score(model: nn.Module, group: Group, options: dict) -> torch.Tensor:
    """First-order Taylor of one batch (Molchanov et al. 2019): (sum over the unit's parameters of w * dL_b/dw)^2.

    options["gradients"] holds that batch's gradients by parameter name; `gradient_group_scores` averages the
    squares over batches, as the paper does (squaring first: the batch-mean gradient cancels at a minimum).
    """
    gradients = options.get("gradients")
    if gradients is None:
        raise ArgumentError("score", "taylor", "a criterion that needs gradients: call it through "
                            "prune_structured(..., data=...) or gradient_group_scores")
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        tensor = member_tensor(model, member)
        if not isinstance(tensor, nn.Parameter):
            continue  # buffers (running statistics) carry no gradient
        product = slices(tensor.detach().double() * gradients[parameter_key(member)].double(), member).sum(dim=1)
        total += per_unit(group, member, product)
    return total.pow(2)


def _group_parameters(model: nn.Module, groups: list[Group]) -> dict[str, nn.Parameter]:
    """Every parameter (not buffer) the groups' members slice, by qualified name."""
    found: dict[str, nn.Parameter] = {}
    for group in groups:
        for member in group.members:
            tensor = member_tensor(model, member)
            if isinstance(tensor, nn.Parameter):
                found.setdefault(parameter_key(member), tensor)
    return found


def gradient_group_scores(model: nn.Module, groups: list[Group], score: str, options: dict, data: Any,
                          loss_fn: Callable | None, n_batches: int) -> list[torch.Tensor]:
    """Score every group on each batch's own gradients, then average over the batches (higher = keep).

    Gradients come from torch.autograd.grad, so the model's .grad fields and requires_grad flags are untouched.
    """
    from prunekit.scores.context import ScoreContext, batch_loss
    from prunekit.scores.gradient import require_gradients, requiring_grad

    function = get_score(score)
    parameters = _group_parameters(model, groups)
    names = list(parameters)
    unique = list({id(p): p for p in parameters.values()}.values())  # tied weights: differentiate once
    position = {id(p): i for i, p in enumerate(unique)}
    unique_names = [next(n for n in names if parameters[n] is p) for p in unique]
    totals = [torch.zeros(group.size, dtype=torch.float64) for group in groups]
    count = 0
    with requiring_grad(unique):
        for batch in ScoreContext(model, [], data=data, loss_fn=loss_fn, n_batches=n_batches).batches():
            grads = require_gradients(torch.autograd.grad(batch_loss(model, batch, loss_fn), unique,
                                                          allow_unused=True),
                                      unique_names, f"score {score!r}", remedy="leave the module out with ignore=[...]")
            batch_options = {**options, "gradients": {n: grads[position[id(parameters[n])]].detach() for n in names}}
            for total, group in zip(totals, groups):
                total += function(model, group, batch_options)
            count += 1
    return [total / count for total in totals]


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
        return fallback_score(model, group, options, "fpgm", "it has no producing layer with one filter per unit")
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
    """Add a criterion (calibration-based methods register theirs).

    A criterion with needs_gradients scores one batch from options["gradients"] (dL_b/dw by parameter name);
    prune_structured averages its scores over the batches.
    """
    SCORES[name] = function
    if needs_gradients:
        NEEDS_GRADIENTS.add(name)


def score_groups(model: nn.Module, groups: list[Group], score: str, options: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """One score vector per group."""
    function = get_score(score)
    options = {} if options is None else options
    return [function(model, group, options) for group in groups]
