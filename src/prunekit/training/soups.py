"""Sparse model soups: average models that share one sparsity mask, so the average keeps it exactly.

Zimmer, Spiegel & Pokutta 2024 (Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging): after each
prune, train several copies of the pruned model (different seeds or batch orders) and average them. Because the
copies share the mask, every pruned weight is zero in all of them and stays zero in the average; the soup is the
starting point of the next prune-retrain round.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import masks as mask_engine
from ..errors import ArgumentError
from .callbacks import _check_prune_kwargs, prune_keeping_masks


def mask_map(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every attached mask by its weight's state-dict name, e.g. {'0.weight': mask}."""
    return {f"{name}.{param}" if name else param: mask for name, _, param, mask in mask_engine.masked_modules(model)}


def clone_with_masks(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose copied weights carry copies of its masks, enforced like the original's."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    for name, _, param_name, mask in list(mask_engine.masked_modules(model)):
        mask_engine.attach(modules[name], mask.clone(), param_name)
    return clone


def check_same_masks(models: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """The masks all `models` share; a model with other masks (or other layers masked) is refused by layer name."""
    reference = mask_map(models[0])
    for i, model in enumerate(models[1:], start=1):
        masks = mask_map(model)
        for name in sorted(reference.keys() | masks.keys()):
            if name not in masks or name not in reference:
                which, other = (i, 0) if name in masks else (0, i)
                raise ArgumentError("models", f"models[{i}]",
                                    "models sharing one mask: a sparse soup averages models pruned alike",
                                    f"Layer {name!r} is masked in models[{which}] but not in models[{other}].")
            if masks[name].shape != reference[name].shape or not torch.equal(masks[name], reference[name].to(
                    masks[name].device)):
                differ = int((masks[name] != reference[name].to(masks[name].device)).sum()) \
                    if masks[name].shape == reference[name].shape else "all"
                raise ArgumentError("models", f"models[{i}]",
                                    "models sharing one mask: a sparse soup averages models pruned alike",
                                    f"Layer {name!r} has a different mask in models[{i}] than in models[0] "
                                    f"({differ} entries differ).")
    return reference


@torch.no_grad()
def average_same_mask(models: Sequence[nn.Module], into: nn.Module | None = None) -> nn.Module:
    """Average the state dicts of models that share their masks; returns `into` (default a copy of models[0]).

    Floating-point entries (weights, biases, normalisation statistics) are averaged in float64 and cast back;
    integer entries (e.g. BatchNorm's num_batches_tracked) are taken from models[0]. The result carries the shared
    masks, so its pruned weights are exactly zero and its sparsity is the ingredients' exactly.
    """
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)) or not models:
        raise ArgumentError("models", type(models).__name__, "a non-empty list of models")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise ArgumentError("models", f"models[{i}] of type {type(model).__name__}", "a list of torch modules")
    shared = check_same_masks(models)
    states = [model.state_dict() for model in models]
    for i, state in enumerate(states[1:], start=1):
        for key in sorted(states[0].keys() | state.keys()):
            if key not in state or key not in states[0]:
                raise ArgumentError("models", f"models[{i}]", "models of one architecture (the same state-dict keys)",
                                    f"{key!r} is in only one of models[0] and models[{i}].")
            if state[key].shape != states[0][key].shape:
                raise ArgumentError("models", f"models[{i}]", "models of one architecture (the same shapes)",
                                    f"{key!r} has shape {tuple(state[key].shape)} there, "
                                    f"{tuple(states[0][key].shape)} in models[0].")
    average: dict[str, Any] = {}
    for key, first in states[0].items():
        if not isinstance(first, torch.Tensor) or not torch.is_floating_point(first):
            average[key] = first
            continue
        total = first.detach().to(torch.float64).clone()
        for state in states[1:]:
            total += state[key].detach().to(device=total.device, dtype=torch.float64)
        average[key] = (total / len(states)).to(first.dtype)
    result = clone_with_masks(models[0]) if into is None else into
    modules = dict(result.named_modules())
    for name, mask in shared.items():
        module_name, _, param_name = name.rpartition(".")
        if module_name not in modules:
            raise ArgumentError("into", type(result).__name__, "a model of the same architecture as the ingredients",
                                f"It has no module {module_name!r}.")
        mask_engine.attach(modules[module_name], mask.clone(), param_name)
    result.load_state_dict(average)
    return result


def sparse_soup_round(model: nn.Module, ingredients: Sequence[int] | Sequence[Callable[[nn.Module], Any]],
                      train_fn: Callable[[nn.Module, int], Any] | None = None, *, sparsity: float | None = None,
                      method: str = "global-magnitude", **prune_kwargs: Any) -> nn.Module:
    """One round of sparse model soups, in place: prune `model` (when `sparsity` is given, earlier masks kept),
    train one masked copy per ingredient, and load their average back into `model`. Returns `model`.

    ingredients: seeds, each trained as train_fn(copy, seed) under torch.manual_seed(seed) (the caller's CPU random
    state is restored afterwards), or functions copy -> None that train a copy their own way.
    Remaining keywords go to prunekit.prune.
    """
    if not isinstance(ingredients, (list, tuple)) or not ingredients:
        raise ArgumentError("ingredients", ingredients, "a non-empty list of seeds or training functions")
    seeds = all(isinstance(x, int) and not isinstance(x, bool) for x in ingredients)
    if not seeds and not all(callable(x) for x in ingredients):
        raise ArgumentError("ingredients", ingredients, "a list of integer seeds, or a list of training functions")
    if seeds and not callable(train_fn):
        raise ArgumentError("train_fn", train_fn, "a function (model, seed) -> None when ingredients are seeds")
    _check_prune_kwargs(prune_kwargs, "sparse_soup_round")
    if sparsity is not None:
        prune_keeping_masks(model, method, sparsity, **prune_kwargs)
    trained = []
    for ingredient in ingredients:
        copy_ = clone_with_masks(model)
        if seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ingredient)
                train_fn(copy_, ingredient)
        else:
            ingredient(copy_)
        trained.append(copy_)
    return average_same_mask(trained, into=model)
