"""The front door: ``prunekit.prune(model, method=..., sparsity=..., pattern=...) -> Report``.

A run is: validate everything (nothing is touched before all arguments are known good), score the chosen weights,
let the budget decide how many units each layer loses, let the pattern turn scores and counts into masks, and only
then attach the masks (or bake them). Iterative methods repeat score -> budget -> mask on a geometric schedule.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import budget as budgets
from . import masks as mask_engine
from .errors import ArgumentError, ModelError, check_sparsity, unknown_choice
from .methods import Method, get_method
from .patterns import NM, Pattern, parse_pattern
from .report import Report, layer_sparsity
from .scores import DATA_FREE, NEEDS_EXAMPLE, SCORES, ScoreContext
from .selection import DEFAULT_TYPES, Selection, Target, select

APPLY_MODES = ("mask", "bake")


def prune(
    model: nn.Module,
    method: str | Method = "magnitude",
    sparsity: float | None = None,
    *,
    pattern: str | Pattern = "unstructured",
    score: str | None = None,
    budget: str | None = None,
    min_keep: float = 0,
    types: Sequence[str] | str = DEFAULT_TYPES,
    include: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    data: Any = None,
    loss_fn: Callable | None = None,
    n_batches: int = 1,
    example_inputs: Any = None,
    rounds: int | None = None,
    seed: int = 0,
    apply: str = "mask",
    keep_original: bool = False,
    **options: Any,
) -> Report:
    """Prune `model` in place with a named method and return a Report of what was removed.

    sparsity: share of the selected weights to remove, in [0, 1) (implied by an N:M pattern).
    pattern: 'unstructured', 'N:M' (e.g. '2:4') or a block 'RxC' (e.g. '4x1').
    score / budget: override the method's choices (see prunekit.scores.SCORES and prunekit.budget.BUDGETS).
    min_keep: per-layer floor for global budgets (a weight count, or a share of each layer if < 1).
    types / include / ignore: which weights ('linear', 'conv', 'embedding'; glob or 're:' name patterns).
    data, loss_fn, n_batches: batches for data-driven scores (SNIP, GraSP, Taylor, rate-distortion).
    example_inputs: an input tensor, for shape-only methods (SynFlow).
    apply: 'mask' keeps masks enforced through training (reversible with keep_original=True); 'bake' leaves zeros.
    """
    started = time.perf_counter()
    recipe = get_method(method)
    arguments = dict(
        method=recipe.name, sparsity=sparsity, pattern=str(getattr(pattern, "name", pattern)), score=score,
        budget=budget, min_keep=min_keep, types=list(types) if not isinstance(types, str) else [types],
        include=include, ignore=ignore, n_batches=n_batches, rounds=rounds, seed=seed, apply=apply, **options,
    )
    if recipe.runner is not None:
        refuse_unused_by_runner(recipe, score=score, budget=budget, min_keep=min_keep, types=types,
                                 loss_fn=loss_fn, n_batches=n_batches, example_inputs=example_inputs, rounds=rounds,
                                 seed=seed, keep_original=keep_original)
        return recipe.runner(model, sparsity=sparsity, pattern=pattern, include=include, ignore=ignore, data=data,
                             apply=apply, **options)

    distortion_proxy = options.pop("distortion_proxy", False)
    plan = _plan(recipe, model, sparsity, pattern, score, budget, min_keep, types, include, ignore, data,
                 example_inputs, rounds, apply, n_batches)
    _check_options(plan, options, distortion_proxy, data, example_inputs)
    refuse_unused_inputs(plan.score, plan.budget, data=data, loss_fn=loss_fn, n_batches=n_batches,
                         example_inputs=example_inputs)
    context = ScoreContext(model=model, targets=plan.selection.targets, data=data, loss_fn=loss_fn,
                           n_batches=n_batches, seed=seed, example_inputs=example_inputs, options=options)
    final_masks = _compute_masks(plan, context, min_keep)
    notes = list(plan.selection.notes)
    if plan.budget == "rate-distortion" and data is None and example_inputs is None:
        notes.append("rate-distortion: no data, so distortion was the data-free proxy asked for with "
                     "distortion_proxy=True (squared score mass removed), not the model's output error")
    for target, mask in zip(plan.selection.targets, final_masks):
        mask_engine.attach(target.module, mask, target.param_name, keep_original=keep_original)
    if apply == "bake":
        mask_engine.bake(model)

    arguments["sparsity"] = plan.sparsity
    return Report(
        layers=[layer_sparsity(t, plan.pattern.name) for t in plan.selection.targets],
        method=recipe.name, arguments=_jsonable(arguments), skipped=plan.selection.skipped,
        notes=notes, seconds=time.perf_counter() - started,
    )


# prune()'s keywords a method with its own runner (the calibration-based LLM methods) does not read, with the
# value that means "not given": anything else is refused by name rather than dropped.
RUNNER_UNUSED = {"score": None, "budget": None, "min_keep": 0, "types": DEFAULT_TYPES, "loss_fn": None,
                 "n_batches": 1, "example_inputs": None, "rounds": None, "seed": 0, "keep_original": False}
# Extra keywords each score reads (anything else in **options is refused); the rate-distortion budget adds its own.
SCORE_OPTIONS = {"taylor": ("taylor_order",), "grasp": ("grasp_temperature",)}


# prune()'s data keywords with the value that means "not given".
INPUT_DEFAULTS = {"data": None, "loss_fn": None, "n_batches": 1, "example_inputs": None}


def inputs_used(score: str, budget: str) -> frozenset[str]:
    """Which of prune()'s data keywords a score and budget read (callers pass only these)."""
    used: set[str] = set()
    if score not in DATA_FREE:  # gradient scores: loss on `n_batches` batches of `data`
        used |= {"data", "loss_fn", "n_batches"}
    if score in NEEDS_EXAMPLE:
        used.add("example_inputs")
    if budget == "rate-distortion":  # output distortion on example_inputs, else on the first batch of data
        used |= {"data", "example_inputs"}
    return frozenset(used)


def method_inputs(method: str | Method, score: str | None = None, budget: str | None = None) -> frozenset[str]:
    """inputs_used for a method, with the score and budget it would run under (its own unless overridden)."""
    recipe = get_method(method)
    if recipe.runner is not None:  # the calibration-based LLM methods read `data` only
        return frozenset({"data"})
    return inputs_used(score or recipe.score, budget or recipe.budget)


def inputs_for(preset: dict[str, Any], method: str | Method, score: str | None = None,
               budget: str | None = None) -> dict[str, Any]:
    """A model's preset prune options cut to the data keywords the method reads (n_batches to 1 for SNIP)."""
    from .scores import batches_for

    recipe = get_method(method)
    score = score or recipe.score
    used = method_inputs(recipe, score, budget)
    if score in DATA_FREE and "example_inputs" in preset:  # rate-distortion then measures on example_inputs alone
        used -= {"data"}
    kept = {k: v for k, v in preset.items() if k not in INPUT_DEFAULTS or k in used}
    if "n_batches" in kept:
        kept["n_batches"] = batches_for(score, kept["n_batches"])
    return kept


def refuse_unused_inputs(score: str, budget: str, **given: Any) -> None:
    """Raise on a data keyword the score and budget would not read, naming it, its value and what reads it."""
    used = inputs_used(score, budget)
    for name, default in INPUT_DEFAULTS.items():
        value = given[name]
        unused = name not in used
        # rate-distortion with a data-free score measures on example_inputs when given, so data would be dropped
        if name == "data" and score in DATA_FREE and given["example_inputs"] is not None:
            unused = True
        if not unused or value is default or (name == "n_batches" and value == default):
            continue
        shown = value if name == "n_batches" else type(value).__name__
        gradient = "a score that needs data (" + ", ".join(sorted(set(SCORES) - DATA_FREE)) + ")"
        readers = {"data": f"{gradient}, or budget='rate-distortion' without example_inputs", "loss_fn": gradient,
                   "n_batches": gradient,
                   "example_inputs": f"score {', '.join(sorted(NEEDS_EXAMPLE))} or budget='rate-distortion'"}[name]
        raise ArgumentError(name, shown, f"{default!r} (its default) for score {score!r} with budget {budget!r}, "
                            f"which do not read it; it is read by {readers}")


def refuse_unused_by_runner(recipe: Method, **given: Any) -> None:
    """Raise on the first keyword a runner method would ignore, naming it, its value and what the method does."""
    from .methods import METHODS

    for name, default in RUNNER_UNUSED.items():
        value = given[name]
        if default is None:
            if value is None:
                continue
        elif name == "types":
            if sorted([value] if isinstance(value, str) else list(value)) == sorted(default):
                continue
        elif value == default and not isinstance(value, bool) or value is default:
            continue
        if name == "score" and value == recipe.score:
            continue  # the method's own score, named explicitly
        if name == "budget" and value == recipe.budget:
            continue
        if name in ("score", "budget"):
            same = [m.name for m in METHODS.values() if m.runner is not None and getattr(m, name) == value]
            hint = f"Method {same[0]!r} does that." if same else ""
            raise ArgumentError(name, value, f"None or {getattr(recipe, name)!r}: method {recipe.name!r} "
                                f"{'scores' if name == 'score' else 'allocates'} with {getattr(recipe, name)}", hint)
        shown = type(value).__name__ if name in ("loss_fn", "example_inputs") else value
        raise ArgumentError(name, shown, f"{default!r} (its default): method {recipe.name!r} calibrates on `data` "
                            f"and does not use {name}")


def _check_options(plan: "_Plan", options: dict[str, Any], distortion_proxy: Any, data: Any,
                   example_inputs: Any) -> None:
    """Refuse extra keywords the chosen score does not read, and rate-distortion with nothing to measure on."""
    known = SCORE_OPTIONS.get(plan.score, ())
    for name in options:
        if name not in known:
            allowed = ", ".join(known) if known else "none"
            raise ArgumentError(name, options[name], f"a keyword the score {plan.score!r} reads ({allowed})")
    if not isinstance(distortion_proxy, bool):
        raise ArgumentError("distortion_proxy", distortion_proxy, "True or False")
    if plan.budget != "rate-distortion":
        if distortion_proxy:
            raise ArgumentError("distortion_proxy", distortion_proxy, "False unless budget is 'rate-distortion'")
        return
    if data is None and example_inputs is None and not distortion_proxy:
        raise ArgumentError("data", None, "batches (or example_inputs) to measure each layer's output distortion on",
                            "The rate-distortion budget measures the model's output; pass distortion_proxy=True "
                            "to rank by the removed squared score mass instead (reported in the notes)")
    if distortion_proxy and (data is not None or example_inputs is not None):
        raise ArgumentError("distortion_proxy", True, "False when data or example_inputs is given (the output "
                            "distortion is measured on them)")


class _Plan:
    """Everything validated before the model is touched."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _plan(recipe, model, sparsity, pattern, score, budget, min_keep, types, include, ignore, data, example_inputs,
          rounds, apply, n_batches) -> _Plan:
    pattern = parse_pattern(pattern)
    score_name = score or recipe.score
    budget_name = budget or recipe.budget
    if score_name not in SCORES:
        raise unknown_choice("score", score_name, SCORES)
    if budget_name not in budgets.BUDGETS:
        raise unknown_choice("budget", budget_name, budgets.BUDGETS)
    if apply not in APPLY_MODES:
        raise unknown_choice("apply", apply, APPLY_MODES)
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ArgumentError("n_batches", n_batches, "a positive integer")
    rounds = recipe.rounds if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ArgumentError("rounds", rounds, "a positive integer")
    sparsity = _resolve_sparsity(sparsity, pattern, budget_name)
    if score_name not in DATA_FREE and data is None:
        raise ArgumentError("data", None, "batches to compute gradients on", f"The score {score_name!r} needs data.")
    if score_name in NEEDS_EXAMPLE and example_inputs is None:
        raise ArgumentError("example_inputs", None, "a tensor with the model's input shape (SynFlow uses its shape)")
    if not isinstance(min_keep, (int, float)) or isinstance(min_keep, bool) or min_keep < 0:
        raise ArgumentError("min_keep", min_keep, "a weight count >= 0, or a share of each layer in [0, 1)")
    if min_keep and budget_name not in ("global", "lamp"):
        raise ArgumentError("min_keep", min_keep, "0 unless budget is 'global' or 'lamp' (a floor under one threshold)")
    selection = select(model, types=types, include=include, ignore=ignore)
    for target in selection.targets:
        pattern.validate(target.name, target.weight.shape, target.kind)
    return _Plan(pattern=pattern, score=score_name, budget=budget_name, sparsity=sparsity, rounds=rounds,
                 selection=selection, data=data, example_inputs=example_inputs)


def _resolve_sparsity(sparsity: float | None, pattern: Pattern, budget_name: str) -> float:
    if isinstance(pattern, NM):
        implied = 1 - pattern.n / pattern.m
        if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
            raise ArgumentError("sparsity", sparsity, f"{implied:g} (or None): pattern {pattern.name} fixes it")
        if budget_name != "uniform":
            raise ArgumentError("budget", budget_name, f"'uniform': pattern {pattern.name} fixes every layer's sparsity")
        return implied
    if sparsity is None:
        raise ArgumentError("sparsity", None, "a number in [0, 1)")
    return check_sparsity(sparsity)


def _compute_masks(plan: _Plan, context: ScoreContext, min_keep: float) -> list[torch.Tensor]:
    """Run the score -> budget -> pattern loop; iterative methods prune on the live weights, then restore them."""
    targets = plan.selection.targets
    if plan.rounds == 1:
        return _one_round(plan, context, plan.sparsity, None, min_keep)
    snapshot = [t.weight.detach().clone() for t in targets]
    current: list[torch.Tensor] | None = None
    try:
        for r in range(1, plan.rounds + 1):
            # Exponential schedule: each round removes the same share of what remains.
            step_sparsity = 1 - (1 - plan.sparsity) ** (r / plan.rounds)
            current = _one_round(plan, context, step_sparsity, current, min_keep)
            with torch.no_grad():
                for target, mask in zip(targets, current):
                    target.weight.masked_fill_(~mask, 0)
    finally:
        with torch.no_grad():
            for target, saved in zip(targets, snapshot):
                target.weight.copy_(saved)
    return current


def _one_round(plan: _Plan, context: ScoreContext, sparsity: float, previous: list[torch.Tensor] | None,
               min_keep: float) -> list[torch.Tensor]:
    targets, pattern = plan.selection.targets, plan.pattern
    scores = SCORES[plan.score](context)
    _check_finite(targets, scores, plan.score)
    if previous is not None:  # what an earlier round removed stays removed
        scores = [s.masked_fill(~m, -torch.inf) for s, m in zip(scores, previous)]
    if isinstance(pattern, NM):
        return [pattern.mask(s, t.kind) for s, t in zip(scores, targets)]
    unit_scores = [pattern.unit_scores(s, t.kind) for s, t in zip(scores, targets)]
    counts = allocate(plan, targets, unit_scores, sparsity, min_keep, context)
    return [pattern.mask(s, t.kind, k) for s, t, k in zip(scores, targets, counts)]


def allocate(plan: _Plan, targets: list[Target], unit_scores: list[torch.Tensor], sparsity: float,
             min_keep: float, context: ScoreContext) -> list[int]:
    """Units to prune per layer under the plan's budget."""
    pattern = plan.pattern
    n_units = [pattern.units(t.weight.shape, t.kind) for t in targets]
    floors = budgets.floor_units(n_units, min_keep, pattern.unit_size) if min_keep else None
    if plan.budget == "uniform":
        return budgets.uniform(n_units, sparsity)
    if plan.budget == "global":
        return budgets.global_threshold(unit_scores, budgets.total_to_prune(n_units, sparsity), floors)
    if plan.budget == "lamp":
        return budgets.lamp(unit_scores, budgets.total_to_prune(n_units, sparsity), floors)
    if plan.budget == "erk":
        return budgets.erk([list(t.weight.shape) for t in targets], n_units, pattern.unit_size, sparsity)
    from .methods.rate_distortion import distortion_probe

    probe = distortion_probe(context, targets, unit_scores, pattern)
    return budgets.rate_distortion(n_units, sparsity, probe)


def _check_finite(targets: list[Target], scores: list[torch.Tensor], score_name: str) -> None:
    for target, s in zip(targets, scores):
        if torch.isnan(s).any() or torch.isposinf(s).any():
            raise ModelError(f"layer {target.name!r} has NaN or infinite {score_name} scores; check its weights and the data")


def _jsonable(arguments: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in arguments.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = list(value)
        else:
            out[key] = repr(value)
    return out
