"""PDP, parameter-free differentiable pruning (Cho, Adya & Naik 2023, PDP: Parameter-free Differentiable Pruning is
All You Need, NeurIPS).

While training, every selected weight is used as w * m(w) with the soft mask m(w) = sigmoid((w^2 - t^2) / tau):
t^2 lies halfway between the largest w^2 the layer's target sparsity would prune and the smallest it would keep,
recomputed from the current weights at every forward pass, so no parameter is added and every weight keeps a
gradient (a pruned-looking weight can still come back). m = 1/2 exactly at w^2 = t^2 and m tends to the hard 0/1
magnitude mask as tau -> 0. The targets ramp up on the cubic schedule from `start_step` to `end_step`, where the
soft masks are replaced by hard masks (through the mask engine) at exactly the target sparsity (or call
``hard_prune()`` when training stops earlier).
Layer targets are the same everywhere (budget 'uniform') or set once by global magnitude at `start_step`
('global', as the paper does). During the soft phase the weights are torch parametrizations, so a state dict saved
then holds 'parametrizations.weight.original' keys; after end_step the model is plain again.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..budget import global_threshold
from ..errors import unknown_choice
from .callbacks import PruningCallback
from .common import attach_keeping, check_real, lowest, targets_of
from .schedules import check_schedule, check_step

PDP_BUDGETS = ("uniform", "global")


def pdp_threshold(w: torch.Tensor, count: int) -> float:
    """t^2 halfway between the count-th smallest w^2 (the largest pruned) and the next (the smallest kept)."""
    squares = torch.sort(w.detach().reshape(-1).double() ** 2).values
    if count <= 0:
        return -math.inf  # nothing to prune: every soft mask is 1
    if count >= squares.numel():
        return math.inf
    return float(squares[count - 1] + squares[count]) / 2.0


def pdp_soft_mask(w: torch.Tensor, t2: float, tau: float) -> torch.Tensor:
    """m(w) = sigmoid((w^2 - t^2) / tau), differentiable in w (t^2 is a constant here)."""
    if t2 == -math.inf:
        return torch.ones_like(w)
    return torch.sigmoid((w * w - t2) / tau)


class _SoftMask(nn.Module):
    """The parametrization w -> w * m(w) of one layer, at the count its PDP callback sets."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau
        self.count = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.count <= 0:
            return w
        return w * pdp_soft_mask(w, pdp_threshold(w, self.count), self.tau).to(w.dtype)


class PDP(PruningCallback):
    """Train with PDP soft masks from `start_step`, ramping each layer's target up to `sparsity` at `end_step`,
    where the hard magnitude masks replace them (the paper's final hard pruning).

    tau: the temperature, in the units of w^2 (the paper's default 1e-4 suits weights of ~0.01-0.1).
    """

    def __init__(self, model: nn.Module, sparsity: float, end_step: int, *, start_step: int = 0, tau: float = 1e-4,
                 budget: str = "uniform", types: Any = ("linear", "conv"), include: Any = None,
                 ignore: Any = None) -> None:
        _, self.sparsity, self.start_step, self.end_step, _ = check_schedule(
            0.0, sparsity, start_step, end_step, 1, ("initial_sparsity", "sparsity", "start_step", "end_step",
                                                     "frequency"))
        self.tau = check_real(tau, "tau", 0.0, math.inf, low_open=True, high_open=True,
                              meaning="the soft mask's temperature, in units of w^2")
        if budget not in PDP_BUDGETS:
            raise unknown_choice("budget", budget, PDP_BUDGETS)
        self.model, self.budget = model, budget
        self.targets = targets_of(model, types, include, ignore)
        self.final_counts: list[int] | None = None  # weights each layer prunes at the end, set at start_step
        self.soft: list[_SoftMask] = []
        self.current_step = 0
        self.done = False

    def ramp(self, step: int) -> float:
        """The share of the final targets asked for at `step`: 0 before start_step, cubic, 1 from end_step on."""
        if step <= self.start_step:
            return 0.0
        progress = min(1.0, (step - self.start_step) / (self.end_step - self.start_step))
        return 1.0 - (1.0 - progress) ** 3

    def layer_counts(self) -> list[int]:
        """Weights each layer prunes at the end: its share of the sparsity (uniform) or global magnitude counts."""
        sizes = [t.weight.numel() for t in self.targets]
        if self.budget == "uniform":
            return [round(self.sparsity * n) for n in sizes]
        scores = [t.weight.detach().abs() for t in self.targets]
        return global_threshold(scores, round(self.sparsity * sum(sizes)))

    def _begin(self) -> None:
        self.final_counts = self.layer_counts()
        for target in self.targets:
            soft = _SoftMask(self.tau)
            parametrize.register_parametrization(target.module, target.param_name, soft, unsafe=True)
            self.soft.append(soft)

    def _set_counts(self, step: int) -> None:
        share = self.ramp(step)
        for soft, count in zip(self.soft, self.final_counts or []):
            soft.count = round(share * count)

    def original(self, index: int) -> torch.Tensor:
        """The trainable weight of layer `index` (under its parametrization during the soft phase)."""
        module, name = self.targets[index].module, self.targets[index].param_name
        if parametrize.is_parametrized(module, name):
            return getattr(module.parametrizations, name).original
        return getattr(module, name)

    def soft_masks(self) -> list[torch.Tensor]:
        """The current soft mask of every layer (all ones before start_step)."""
        masks = []
        for i, soft in enumerate(self.soft or [None] * len(self.targets)):
            w = self.original(i).detach()
            count = soft.count if soft is not None else 0
            masks.append(pdp_soft_mask(w, pdp_threshold(w, count), self.tau))
        return masks

    def hard_prune(self) -> None:
        """Remove the soft masks and mask each layer's final count of smallest |w| (exactly the target sparsity)."""
        if self.final_counts is None:
            self.final_counts = self.layer_counts()
        for target in self.targets:
            if parametrize.is_parametrized(target.module, target.param_name):
                parametrize.remove_parametrizations(target.module, target.param_name, leave_parametrized=False)
        for target, count in zip(self.targets, self.final_counts):
            attach_keeping(target, ~lowest(target.weight.abs(), count))
        self.soft = []
        self.done = True

    def on_train_begin(self) -> None:
        """Start the soft phase when training starts at or after start_step."""
        self.on_step_end(self.current_step)

    def on_step_end(self, step: int) -> None:
        """Install the soft masks at start_step, raise their targets, harden them at end_step."""
        self.current_step = check_step(step, "step")
        if self.done:
            return
        if step >= self.end_step:
            self.hard_prune()
            return
        if step >= self.start_step and not self.soft:
            self._begin()
        self._set_counts(step)
