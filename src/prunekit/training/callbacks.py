"""Pruning during and before training, as callbacks for a plain PyTorch loop (or the transformers Trainer).

- ``GradualPruning``: Zhu & Gupta 2017, re-prunes on a cubic schedule while the model trains; what was pruned stays
  pruned, so sparsity only grows and reaches its final value exactly at ``end_step``.
- ``PruneAtInit``: prune once before training (SNIP, GraSP, SynFlow, random / ERK-random, magnitude); the masks are
  then enforced through sparse training by the mask engine (any torch optimizer re-zeroes masked weights).
- ``fit``: a small training loop that drives callbacks, for users and tests.

Every callback prunes through ``prunekit.prune`` with masks attached; scores, budgets and patterns are its own.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import masks as mask_engine
from ..api import prune
from ..errors import ArgumentError, check_sparsity, unknown_choice
from ..methods import get_method
from ..report import Report
from ..scores import DATA_FREE
from ..scores.context import batch_loss
from ..selection import select
from .schedules import check_schedule, check_step, cubic_sparsity

# Scores under which a weight that is exactly zero ranks lowest (score 0, every score >= 0): re-pruning with them
# chooses the masked weights again before any live one, so earlier masks are kept without any repair.
ZERO_RANKS_LOWEST = frozenset({"magnitude", "snip", "taylor", "synflow", "wanda"})

PRUNE_AT_INIT_METHODS = ("snip", "grasp", "synflow", "erk-random", "random", "magnitude")

_SELECTION_KEYS = ("types", "include", "ignore")


class PruningCallback:
    """The callback protocol ``fit`` (and the transformers adapter) drive; every hook is optional and a no-op here.

    Steps are counted as optimizer steps completed (1, 2, ...), epochs as epochs completed, as transformers does.
    """

    def on_train_begin(self) -> None:
        """Before the first step."""

    def on_step_end(self, step: int) -> None:
        """After optimizer step number `step` (1-based)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After epoch number `epoch` (1-based)."""

    def on_train_end(self) -> None:
        """After the last step."""


# --- pruning that keeps earlier masks -----------------------------------------------------------------------------


def _check_prune_kwargs(prune_kwargs: Mapping[str, Any], owner: str) -> None:
    """Refuse prunekit.prune arguments the callback sets itself or that would break masks kept across prunes."""
    for key in ("sparsity", "model", "method"):
        if key in prune_kwargs:
            raise ArgumentError(key, prune_kwargs[key], f"not a keyword here: {owner} sets it itself")
    if prune_kwargs.get("apply", "mask") != "mask":
        raise ArgumentError("apply", prune_kwargs["apply"],
                            f"'mask': {owner} keeps masks attached so pruned weights stay zero while training")
    if prune_kwargs.get("keep_original", False):
        raise ArgumentError("keep_original", prune_kwargs["keep_original"],
                            f"False: {owner} re-prunes on top of its own masks, whose originals cannot be kept")


def prune_keeping_masks(model: nn.Module, method: str, sparsity: float, **prune_kwargs: Any) -> Report:
    """prunekit.prune to `sparsity`, never reviving a weight an earlier mask pruned (sparsity only grows).

    With scores that rank an exact zero lowest (magnitude, SNIP, Taylor, SynFlow, Wanda) the masked weights, being
    zero, are chosen again first and the new masks contain the old ones as they are. Should a new mask keep a weight
    the old one pruned (random scores with another seed, GraSP, or live weights that are exactly zero and tie), the
    old pruned weights stay pruned and the layer's count from the new mask is met with the smallest |w| among those
    the method chose; the revived weights get their values back.
    """
    recipe = get_method(method)
    score = prune_kwargs.get("score") or recipe.score
    old = {id(getattr(m, p)): (n, m, p, mask.clone()) for n, m, p, mask in mask_engine.masked_modules(model)}
    risky = recipe.runner is not None or score not in ZERO_RANKS_LOWEST or any(
        bool((getattr(m, p).detach()[mask] == 0).any()) for _, m, p, mask in old.values())
    # The live values of masked weights, only when a repair may need them back (a new mask may zero them).
    live = {key: getattr(m, p).detach()[mask].clone() for key, (_, m, p, mask) in old.items()} if risky else {}
    report = prune(model, recipe, sparsity, **prune_kwargs)
    for _, module, param_name, new_mask in list(mask_engine.masked_modules(model)):
        param = getattr(module, param_name)
        entry = old.get(id(param))
        if entry is None or not (new_mask & ~entry[3]).any():
            continue
        _repair(module, param_name, entry[3], new_mask, live.get(id(param)))
    return report


@torch.no_grad()
def _repair(module: nn.Module, param_name: str, old_mask: torch.Tensor, new_mask: torch.Tensor,
            live_values: torch.Tensor | None) -> None:
    """Keep every weight `old_mask` pruned; prune as many in all as `new_mask` does (at least as many as before)."""
    param = getattr(module, param_name)
    values = torch.zeros_like(param)
    if live_values is not None:
        values[old_mask] = live_values
    n_prune = max(int((~new_mask).sum()), int((~old_mask).sum()))
    extra = n_prune - int((~old_mask).sum())
    chosen = (old_mask & ~new_mask).reshape(-1)  # live before, chosen now: the candidates for the extra prunes
    keep = old_mask.clone().reshape(-1)
    if extra:
        candidates = chosen.nonzero().squeeze(1)
        order = torch.sort(values.reshape(-1)[candidates].abs().float(), stable=True).indices
        keep[candidates[order[:extra]]] = False
    keep = keep.reshape(old_mask.shape)
    revived = keep & ~new_mask
    param[revived] = values[revived].to(param.dtype)
    mask_engine.attach(module, keep, param_name)


def selection_counts(model: nn.Module, **selection: Any) -> tuple[int, int]:
    """(pruned, total) weights over the selection prunekit.prune would make, counted from the attached masks."""
    chosen = select(model, **{k: v for k, v in selection.items() if k in _SELECTION_KEYS and v is not None})
    pruned = total = 0
    for target in chosen.targets:
        mask = mask_engine.get_mask(target.module, target.param_name)
        total += target.weight.numel()
        pruned += 0 if mask is None else int((~mask).sum())
    return pruned, total


# --- gradual pruning (Zhu & Gupta 2017) ----------------------------------------------------------------------------


class GradualPruning(PruningCallback):
    """Prune while training on Zhu & Gupta's cubic schedule, from `initial_sparsity` at `start_step` to
    `final_sparsity` at `end_step`, re-pruning every `frequency` steps with prunekit.prune (masks attached).

    Call ``on_step_end(step)`` after each optimizer step (``fit`` and the transformers adapter do), or ``step()``,
    which counts steps itself. Before `start_step` the model is left dense; a weight once pruned stays pruned.
    Remaining keywords go to prunekit.prune (pattern, budget, include, ignore, data, ...).
    """

    def __init__(self, model: nn.Module, method: str = "magnitude", *, final_sparsity: float, end_step: int,
                 start_step: int = 0, frequency: int = 100, initial_sparsity: float = 0.0,
                 **prune_kwargs: Any) -> None:
        self.method = get_method(method).name
        (self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step,
         self.frequency) = check_schedule(initial_sparsity, final_sparsity, start_step, end_step, frequency,
                                          ("initial_sparsity", "final_sparsity", "start_step", "end_step",
                                           "frequency"))
        _check_prune_kwargs(prune_kwargs, "GradualPruning")
        self.model = model
        self.prune_kwargs = prune_kwargs
        self.sparsity = 0.0  # the scheduled sparsity last applied
        self.current_step = 0
        self.report: Report | None = None
        self.history: list[tuple[int, float]] = []  # (step, scheduled sparsity) of every prune

    def scheduled(self, step: int) -> float:
        """The sparsity the schedule asks for at `step` (0 before start_step: the model is still dense)."""
        if step < self.start_step:
            return 0.0
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step,
                              self.frequency)

    def on_train_begin(self) -> None:
        """Apply the schedule at the current step (prunes to initial_sparsity when training starts at start_step)."""
        self.on_step_end(self.current_step)

    def on_step_end(self, step: int) -> None:
        """Re-prune if the schedule's sparsity at `step` is above the one applied."""
        self.current_step = check_step(step, "step")
        target = self.scheduled(step)
        if target > self.sparsity:
            self.report = prune_keeping_masks(self.model, self.method, target, **self.prune_kwargs)
            self.sparsity = target
            self.history.append((step, target))

    def step(self) -> None:
        """Count one more optimizer step and apply the schedule."""
        self.on_step_end(self.current_step + 1)

    @property
    def done(self) -> bool:
        """Whether the final sparsity has been applied."""
        return self.sparsity >= self.final_sparsity


# --- pruning at initialisation ------------------------------------------------------------------------------------


class PruneAtInit(PruningCallback):
    """Prune once before training, then train sparse: the masks stay enforced by any torch optimizer.

    method: 'snip' and 'grasp' (need `data`), 'synflow' (needs an input shape: `example_inputs`, else the first
    batch of `data`), 'erk-random', 'random' or 'magnitude'. Remaining keywords go to prunekit.prune.
    Call ``apply()`` directly, or let ``fit`` / the transformers adapter call it at the start of training.
    """

    def __init__(self, model: nn.Module, method: str, sparsity: float, data: Any = None, **prune_kwargs: Any) -> None:
        if method not in PRUNE_AT_INIT_METHODS:
            raise unknown_choice("method", method, PRUNE_AT_INIT_METHODS)
        self.sparsity = check_sparsity(sparsity)
        if method == "synflow" and prune_kwargs.get("example_inputs") is None:
            if data is None:
                raise ArgumentError("example_inputs", None, "a tensor with the model's input shape, or data to take "
                                    "it from (SynFlow uses only the shape)")
            prune_kwargs["example_inputs"] = _first_inputs(data)
            data = None  # read for its shape only: prune() would refuse data SynFlow does not score on
        if get_method(method).score not in DATA_FREE and data is None:
            raise ArgumentError("data", None, "batches to compute gradients on", f"{method!r} needs data.")
        _check_prune_kwargs(prune_kwargs, "PruneAtInit")
        _refuse_unused_inputs(method, data, prune_kwargs)
        self.model, self.method, self.data, self.prune_kwargs = model, method, data, prune_kwargs
        self.report: Report | None = None

    def apply(self) -> Report:
        """Prune now (once; later calls return the first report)."""
        if self.report is None:
            self.report = prune(self.model, self.method, self.sparsity, data=self.data, **self.prune_kwargs)
        return self.report

    def on_train_begin(self) -> None:
        """Prune before the first step."""
        self.apply()


def _refuse_unused_inputs(method: str, data: Any, prune_kwargs: dict[str, Any]) -> None:
    """Refuse now, not at the first step, the data keywords `method` would not read (prune() refuses them too)."""
    from ..api import INPUT_DEFAULTS, refuse_unused_inputs

    recipe = get_method(method)
    given = {name: prune_kwargs.get(name, default) for name, default in INPUT_DEFAULTS.items()}
    refuse_unused_inputs(prune_kwargs.get("score") or recipe.score, prune_kwargs.get("budget") or recipe.budget,
                         **{**given, "data": data})


def _first_inputs(data: Any) -> torch.Tensor:
    """The inputs of the first batch of `data` (one (inputs, labels) batch, or an iterable of batches)."""
    from ..distill import split_batch

    batch = data
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)):
        batch = next(iter(data), None) if not isinstance(data, torch.Tensor) else data
    inputs, _ = split_batch(batch) if batch is not None else (None, None)
    if not isinstance(inputs, torch.Tensor):
        raise ArgumentError("example_inputs", None, "a tensor with the model's input shape (data gives none)")
    return inputs


# --- a small training loop ----------------------------------------------------------------------------------------


@dataclass
class FitResult:
    """What ``fit`` did: the mean training loss of each epoch, optimizer steps taken and wall time."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """The last epoch's mean loss (nan before any epoch)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


def fit(model: nn.Module, batches: Iterable[Any] | Callable[[int], Iterable[Any]], epochs: int,
        optimizer: torch.optim.Optimizer, callbacks: Sequence[Any] = (), loss_fn: Callable | None = None, *,
        progress: bool = True, desc: str = "training") -> FitResult:
    """Train `model` for `epochs` over `batches`, driving `callbacks` (the PruningCallback hooks, any subset).

    batches: a re-iterable of (inputs, labels) pairs or dicts of model inputs with 'labels' (a list, a DataLoader),
    or a function epoch -> batches for a new order each epoch. loss_fn(output, labels) defaults to cross-entropy
    (or a transformers model's own loss). The model is in train mode while fitting, then back in its former mode.
    """
    from tqdm import tqdm

    epochs = check_step(epochs, "epochs")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ArgumentError("optimizer", type(optimizer).__name__, "a torch.optim.Optimizer over the model's parameters")
    if isinstance(callbacks, PruningCallback) or not isinstance(callbacks, (list, tuple)):
        raise ArgumentError("callbacks", type(callbacks).__name__, "a list of callbacks (PruningCallback hooks)")
    was_training = model.training
    started = time.perf_counter()
    result = FitResult()
    model.train()
    _call(callbacks, "on_train_begin")
    try:
        for epoch in range(epochs):
            epoch_batches = batches(epoch) if callable(batches) else batches
            total = len(epoch_batches) if hasattr(epoch_batches, "__len__") else None
            # disable=None: a live bar on a terminal only, silent in logs and tests.
            bar = tqdm(epoch_batches, total=total, desc=f"{desc} {epoch + 1}/{epochs}", unit="step", leave=False,
                       disable=None if progress else True, file=sys.stderr)
            loss_sum, count = 0.0, 0
            for batch in bar:
                if not isinstance(batch, Mapping) and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                    raise ArgumentError("batches", f"an item of type {type(batch).__name__}",
                                        "(inputs, labels) pairs or dicts of model inputs with 'labels'")
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(model, batch, loss_fn)
                loss.backward()
                optimizer.step()
                result.steps += 1
                value = float(loss.detach())
                loss_sum, count = loss_sum + value, count + 1
                bar.set_postfix(loss=f"{value:.3f}")
                _call(callbacks, "on_step_end", result.steps)
            result.epoch_losses.append(loss_sum / count if count else math.nan)
            _call(callbacks, "on_epoch_end", epoch + 1)
        _call(callbacks, "on_train_end")
    finally:
        model.train(was_training)
        result.seconds = time.perf_counter() - started
    return result
