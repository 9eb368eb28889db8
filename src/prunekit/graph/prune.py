"""Structured pruning: score the units of every group, decide how many each group keeps, remove them for real.

    result = prune_structured(model, example_inputs, ratio=0.5, score="l2", budget="global", round_to=8)

leaves `model` an ordinary, smaller nn.Module whose outputs keep their shape; `result.plan` records what each
tensor kept (replayable on a fresh instance of the class, see `prunekit.graph.save`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from prunekit.errors import ArgumentError, ModelError, check_sparsity, unknown_choice
from prunekit.graph.groups import DependencyGraph, Group
from prunekit.graph.importance import NEEDS_GRADIENTS, get_score, gradient_group_scores
from prunekit.graph.importance import FALLBACKS
from prunekit.graph.surgery import Plan, apply_checked, apply_plan, merge_removals, plan_from_removals, run_located

BUDGETS = ("uniform", "global", "macs", "latency")
# What to do with a group whose size a reshape reads from a constant the tracer could not tie to an attribute.
UNTRACKED_SIZES = ("keep-whole", "error")


@dataclass
class GroupDecision:
    """What happened to one group."""

    name: str
    kind: str
    size: int
    kept: int
    notes: list[str] = field(default_factory=list)


@dataclass
class StructuredResult:
    """The outcome of a structured pruning run."""

    plan: Plan
    decisions: list[GroupDecision]
    graph: DependencyGraph
    settings: dict[str, Any]
    costs: dict[str, Any] = field(default_factory=dict)  # "before"/"after" CostReports when measured
    removed_modules: list[str] = field(default_factory=list)  # blocks replaced by nn.Identity (depth pruning)

    @property
    def notes(self) -> list[str]:
        return [f"{d.name}: {note}" for d in self.decisions for note in d.notes]

    def table(self) -> str:
        """One line per group that changed, then barriers and notes."""
        lines = [f"{'group':60s} {'kind':8s} {'before':>7s} {'after':>7s}"]
        for d in self.decisions:
            if d.kept != d.size:
                lines.append(f"{d.name[:60]:60s} {d.kind:8s} {d.size:7d} {d.kept:7d}")
        unchanged = sum(1 for d in self.decisions if d.kept == d.size)
        lines.append(f"({unchanged} of {len(self.decisions)} groups unchanged)")
        for barrier in self.graph.barriers:
            lines.append(f"barrier {barrier.where}: {barrier.reason}")
        lines += [f"note: {n}" for n in self.notes]
        if "before" in self.costs and "after" in self.costs:
            from prunekit.measure import compare

            lines += ["", compare(self.costs["before"], self.costs["after"])]
        return "\n".join(lines)


# --- how many units each group keeps ------------------------------------------------------------------------------


def rounded_keep(size: int, keep: float, round_to: int, min_keep: int) -> int:
    """A width: `keep` rounded to the nearest multiple of round_to, at least min_keep and round_to, at most size."""
    width = int(round(keep))
    if round_to > 1:
        width = int(round(width / round_to)) * round_to
        width = max(width, round_to)
    return max(min(width, size), min(min_keep, size), 1)


def uniform_keeps(groups: Sequence[Group], ratio: float, round_to: int) -> list[int]:
    """Every group keeps (1 - ratio) of its units."""
    return [rounded_keep(g.size, g.size * (1 - ratio), round_to, g.min_keep) for g in groups]


def global_keeps(groups: Sequence[Group], scores: Sequence[torch.Tensor], ratio: float, round_to: int) -> list[int]:
    """The lowest-scoring ratio of all units go, scores made comparable by dividing by each group's mean."""
    normalised = []
    for group, score in zip(groups, scores):
        mean = float(score.mean()) if score.numel() else 0.0
        normalised.append(score / mean if mean > 0 else score)
    everything = torch.cat(normalised) if normalised else torch.zeros(0)
    total = len(everything)
    to_remove = int(round(ratio * total))
    if to_remove == 0:
        return [g.size for g in groups]
    threshold = torch.sort(everything).values[to_remove - 1]
    keeps = []
    for group, score in zip(groups, normalised):
        removed = int((score <= threshold).sum())
        keeps.append(rounded_keep(group.size, group.size - removed, round_to, group.min_keep))
    return keeps


def removed_units(score: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the lowest-scoring units beyond the `keep` best (ties: lower index goes first)."""
    order = torch.argsort(score, stable=True)
    return order[: len(score) - keep]


def plan_for(model: nn.Module, groups: Sequence[Group], scores: Sequence[torch.Tensor], keeps: Sequence[int]) -> Plan:
    """The tensors' kept indices when each group keeps keeps[i] of its best units."""
    removals = [g.removed_indices(removed_units(s, k)) for g, s, k in zip(groups, scores, keeps) if k < g.size]
    return plan_from_removals(model, merge_removals(removals)) if removals else {}


# --- the search for a MACs or latency target -----------------------------------------------------------------------


def search_ratio(measure: Callable[[float], float], target: float, high: float = 0.95, steps: int = 12) -> float:
    """The largest ratio in [0, high] whose measured cost is still above `target` is too small: bisect on ratio.

    `measure(ratio)` is the cost after pruning at `ratio` as a share of the unpruned cost (decreasing in ratio).
    Returns the smallest ratio that meets cost <= target (or `high` if none does).
    """
    low, top = 0.0, high
    if measure(top) > target:
        return top
    for _ in range(steps):
        middle = (low + top) / 2
        if measure(middle) <= target:
            top = middle
        else:
            low = middle
    return top


# --- the front door --------------------------------------------------------------------------------------------------


def _check_options(ratio: Any, budget: str, target: Any, round_to: Any) -> None:
    if budget not in BUDGETS:
        raise unknown_choice("budget", budget, BUDGETS)
    if budget in ("macs", "latency"):
        if target is None or not isinstance(target, (int, float)) or not 0 < float(target) < 1:
            raise ArgumentError("target", target, f"a share in (0, 1) of the dense model's {budget} to keep, "
                                f"for budget={budget!r}")
    elif ratio is None:
        raise ArgumentError("ratio", None, "the share of units to remove, in [0, 1)")
    else:
        check_sparsity(ratio, "ratio")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ArgumentError("round_to", round_to, "a positive integer (widths are kept a multiple of it)")


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (read by the adapter, not traced)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def default_graph(model: nn.Module, example_inputs: Any, barriers: Iterable[str] = ()) -> DependencyGraph:
    """transformers models: heads and MLP neurons read from their modules; anything else: the torch.fx tracer."""
    if is_transformers_model(model):
        from prunekit.graph.transformers import transformers_graph

        return transformers_graph(model)
    from prunekit.graph.trace import build_graph

    return build_graph(model, example_inputs, barriers)


def select_groups(graph: DependencyGraph, ignore: Iterable[str],
                  untracked_sizes: str = "keep-whole") -> tuple[list[Group], list[GroupDecision]]:
    """Groups to prune: those not touching an ignored module (exact names or prefixes) and not kept whole by the
    tracer (a reshape reads their size from an untracked constant: listed, or an error with untracked_sizes="error")."""
    if untracked_sizes not in UNTRACKED_SIZES:
        raise unknown_choice("untracked_sizes", untracked_sizes, UNTRACKED_SIZES)
    ignore = list(ignore)
    chosen, skipped = [], []
    for group in graph.groups:
        hit = [name for name in group.modules() if any(name == i or name.startswith(i + ".") for i in ignore)]
        if hit:
            skipped.append(GroupDecision(group.name, group.kind, group.size, group.size, [f"ignored ({hit[0]})"]))
        elif group.kept_whole:
            if untracked_sizes == "error":
                raise ModelError(f"group {group.name!r} cannot be pruned: {group.kept_whole}. Pass "
                                 "untracked_sizes='keep-whole' to keep it whole (listed in the result), or store the "
                                 "size in an attribute of the module that reshapes")
            skipped.append(GroupDecision(group.name, group.kind, group.size, group.size,
                                         [f"kept whole: {group.kept_whole}"]))
        else:
            chosen.append(group)
    return chosen, skipped


def _check_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """What the pruned model is run on before prune_structured returns: the example inputs, or for a transformers
    model given none, four token ids (its adapter needs no trace)."""
    if example_inputs is not None:
        return example_inputs
    if is_transformers_model(model):
        return torch.zeros(1, 4, dtype=torch.long)
    raise ArgumentError("example_inputs", None, "inputs the model accepts (a tensor or a tuple of tensors): the "
                        "tracer runs them, and the pruned model is checked on them before it is returned")


def _refuse_unused_batches(score: str, **given: Any) -> None:
    """Refuse data, loss_fn or n_batches for a score that reads no gradients (they would be ignored)."""
    if score in NEEDS_GRADIENTS:
        return
    for name, default in (("data", None), ("loss_fn", None), ("n_batches", 1)):
        value = given[name]
        if value is default or (name == "n_batches" and value == default):
            continue
        shown = value if name == "n_batches" else type(value).__name__
        raise ArgumentError(name, shown, f"{default!r} (its default) for score {score!r}, which reads no "
                            f"gradients; it is read by the gradient scores ({', '.join(sorted(NEEDS_GRADIENTS))})")


def prune_structured(
    model: nn.Module,
    example_inputs: Any,
    ratio: float | None = None,
    *,
    score: str = "l2",
    budget: str = "uniform",
    target: float | None = None,
    round_to: int = 1,
    barriers: Iterable[str] = (),
    ignore: Iterable[str] = (),
    data: Any = None,
    loss_fn: Callable | None = None,
    n_batches: int = 1,
    seed: int = 0,
    fallback: str | None = None,
    graph: DependencyGraph | None = None,
    measure_costs: bool = False,
    latency_batch: int = 16,
    untracked_sizes: str = "keep-whole",
) -> StructuredResult:
    """Remove the least important units of every coupled group; the model is changed in place.

    ratio: share of units to remove (uniform: in every group; global: across all groups).
    budget: "uniform", "global", "macs" or "latency" (the last two search the global ratio that keeps `target`
    of the dense MACs or measured latency at batch `latency_batch`).
    fallback: for score "bn-scale" or "fpgm", score groups they cannot ("l1" or "l2") instead of refusing them;
    each such group is named in the result's notes.
    untracked_sizes: "keep-whole" (groups whose size a reshape reads from a constant of no attribute are not pruned,
    and the decisions say why) or "error".
    Before returning, the pruned model runs on `example_inputs`; if that fails (or the output shape changes) the
    model is restored exactly and a ModelError names the module where it failed.
    """
    _check_options(ratio, budget, target, round_to)
    get_score(score)
    if fallback is not None and score not in ("bn-scale", "fpgm"):
        raise ArgumentError("fallback", fallback, f"None for score {score!r} (it scores every group; only bn-scale "
                            "and fpgm may need a substitute)")
    if fallback is not None and fallback not in FALLBACKS:
        raise unknown_choice("fallback", fallback, FALLBACKS)
    if untracked_sizes not in UNTRACKED_SIZES:
        raise unknown_choice("untracked_sizes", untracked_sizes, UNTRACKED_SIZES)
    _refuse_unused_batches(score, data=data, loss_fn=loss_fn, n_batches=n_batches)
    check_inputs = _check_inputs(model, example_inputs)
    expected, where, error = run_located(model, check_inputs)
    if error is not None:
        from prunekit.graph.trace import _as_tuple, _describe_inputs

        shown = _describe_inputs(_as_tuple(check_inputs)) if not isinstance(check_inputs, dict) else "a dict"
        raise ArgumentError("example_inputs", shown, f"inputs the model accepts; running it failed in module "
                            f"{where!r}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    if graph is None:
        graph = default_graph(model, example_inputs, barriers)
    groups, skipped = select_groups(graph, ignore, untracked_sizes)
    options = {"seed": seed, "fallback": fallback}
    if score in NEEDS_GRADIENTS:
        scores = gradient_group_scores(model, groups, score, options, data, loss_fn, n_batches)
    else:
        scores = [get_score(score)(model, group, options) for group in groups]
    costs: dict[str, Any] = {}
    if measure_costs:
        from prunekit.measure import cost_report

        costs["before"] = cost_report(model, example_inputs)

    def keeps_at(share: float) -> list[int]:
        if budget == "uniform":
            return uniform_keeps(groups, share, round_to)
        return global_keeps(groups, scores, share, round_to)

    if budget in ("macs", "latency"):
        ratio, keeps = _search_target(model, example_inputs, groups, scores, keeps_at, budget, float(target),
                                      latency_batch)
    else:
        keeps = keeps_at(float(ratio))
    plan = plan_for(model, groups, scores, keeps)
    decisions = skipped + [GroupDecision(g.name, g.kind, g.size, k, list(g.notes)) for g, k in zip(groups, keeps)]
    for decision, group in zip(decisions[len(skipped):], groups):
        wanted = group.size - round(float(ratio) * group.size)
        if budget == "uniform" and wanted < decision.kept and wanted < max(1, group.min_keep):
            decision.notes.append(f"ratio {ratio:g} would remove every unit; kept {decision.kept}")
    if plan:
        if is_transformers_model(model):
            from prunekit.graph.transformers import _slices_hidden

            if _slices_hidden(model, plan):  # a narrower hidden size is the point: an encoder's output narrows too
                expected = None
        apply_checked(model, plan, check_inputs, expected)
    if measure_costs:
        from prunekit.measure import cost_report

        costs["after"] = cost_report(model, example_inputs)
    settings = {"ratio": ratio, "score": score, "budget": budget, "target": target, "round_to": round_to,
                "barriers": sorted(barriers), "ignore": sorted(ignore), "seed": seed,
                "fallback": fallback, "untracked_sizes": untracked_sizes}
    return StructuredResult(plan, decisions, graph, settings, costs)


# Groups this small move in steps too large for a global ranking under a cost target: in a ViT built on
# nn.MultiheadAttention one head unit is 1/12 of the residual stream, and units of equal score all leave at once.
COARSE_UNITS = 32


def _search_target(model, example_inputs, groups, scores, keeps_at, budget: str, target: float,
                   batch: int) -> tuple[float, list[int]]:
    """The global ratio, and the widths, whose pruned copy keeps at most `target` of the dense MACs (or latency).

    Two bisections: first on one ratio for all groups, coarse groups (<= COARSE_UNITS units) pruned uniformly so that
    they step one unit at a time; then, with the coarse widths fixed, on the ratio of the fine groups alone, so that
    the result lands just under the target instead of one coarse step below it.
    """
    from prunekit import measure

    if budget == "macs":
        def cost(m: nn.Module) -> float:
            return float(measure.count_macs(m, example_inputs))
    else:
        inputs = measure.batch_of(example_inputs, batch)

        def cost(m: nn.Module) -> float:
            return measure.measure_latency(m, inputs, warmup=2, repeats=7).median

    dense = cost(model)
    coarse = [g.size <= COARSE_UNITS for g in groups]

    def share_of(keeps: list[int]) -> float:
        candidate = copy.deepcopy(model)
        plan = plan_for(candidate, groups, scores, keeps)
        if plan:
            apply_plan(candidate, plan)
        return cost(candidate) / dense

    def mixed(ratio: float, coarse_keeps: list[int]) -> list[int]:
        return [c if is_coarse else k for c, k, is_coarse in zip(coarse_keeps, keeps_at(ratio), coarse)]

    steps = 12 if budget == "macs" else 7
    if not any(coarse):
        ratio = search_ratio(lambda r: share_of(keeps_at(r)), target, steps=steps)
        return ratio, keeps_at(ratio)

    def first_pass(r: float) -> list[int]:
        return mixed(r, [rounded_keep(g.size, g.size * (1 - r), 1, g.min_keep) for g in groups])

    ratio = search_ratio(lambda r: share_of(first_pass(r)), target, steps=steps)
    below = first_pass(ratio)
    if all(k == g.size for k, g, is_coarse in zip(below, groups, coarse) if is_coarse):
        return ratio, below  # no coarse group moved: the first pass was fine-grained already
    # The coarse widths just under the target, and one unit wider (over it alone, but the fine groups can make up).
    above = [min(k + 1, g.size) if is_coarse and k < g.size else k for k, g, is_coarse in zip(below, groups, coarse)]
    best: tuple[float, float, list[int]] | None = None
    for coarse_keeps, high in ((below, ratio), (above, 0.95)):
        fine_ratio = search_ratio(lambda r: share_of(mixed(r, coarse_keeps)), target, high=high, steps=steps)
        keeps = mixed(fine_ratio, coarse_keeps)
        reached = share_of(keeps)
        if reached <= target and (best is None or reached > best[0]):
            best = (reached, fine_ratio, keeps)
    if best is None:
        return ratio, below
    return best[1], best[2]


def describe_widths(decisions: Sequence[GroupDecision]) -> dict[str, list[int]]:
    """{group name: [before, after]} for JSON reports."""
    return {d.name: [d.size, d.kept] for d in decisions}


def ratio_of(decisions: Sequence[GroupDecision]) -> float:
    """Share of all units removed."""
    total = sum(d.size for d in decisions)
    return 0.0 if total == 0 else 1 - sum(d.kept for d in decisions) / total

