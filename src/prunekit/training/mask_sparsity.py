"""MaskSparsity, pruning-aware sparse regularisation (Jiang, Zhao, Zhao, An, Tang & Wang 2022, Pruning-aware Sparse
Regularization for Network Pruning, Machine Intelligence Research).

Plain sparsity training (network slimming) pushes every weight or channel towards zero, including the ones that will
be kept, which costs capacity. MaskSparsity first fixes the pruning mask, then regularises only what that mask will
remove: an L1 penalty on the weights to prune (granularity 'weight'), or a group-lasso penalty (the L2 norm of each
output channel's weights) on the channels to prune ('channel'; the paper regularises the BatchNorm scales of those
filters, this works on any Linear or Conv). Kept weights feel no penalty at all. At `end_step` the selected weights
or channels are pruned (masked; they have been driven towards zero, so removing them costs little).
The penalty's gradient is added to each weight's gradient by a tensor hook, so it works in any training loop and
in the transformers Trainer (the hook adds it once per backward pass: with gradient accumulation over k
micro-batches the penalty counts k times). ``penalty()`` gives the same term as a differentiable scalar, for
loops that add it to their loss themselves with ``via_hooks=False``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError, unknown_choice
from .callbacks import PruningCallback
from .common import attach_keeping, check_real, layer_counts, lowest, targets_of
from .schedules import check_schedule, check_step

GRANULARITIES = ("weight", "channel")


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output channel (row) of a weight."""
    return w.reshape(w.shape[0], -1).norm(dim=1)


def penalty_gradient(w: torch.Tensor, pruned: torch.Tensor, strength: float, granularity: str) -> torch.Tensor:
    """d penalty / d w: strength * sign(w) on pruned weights, or strength * w_c / ||w_c|| on pruned channels."""
    w = w.detach()
    if granularity == "weight":
        return strength * torch.sign(w) * pruned.to(w.dtype)
    norms = row_norms(w).reshape(-1, *([1] * (w.dim() - 1)))
    direction = torch.where(norms > 0, w / norms.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))
    return strength * direction * pruned.to(w.dtype)


class MaskSparsity(PruningCallback):
    """Fix the pruning mask at `start_step` (smallest |w|, or smallest channel L2 norm, per layer at `sparsity`),
    penalise only what it selects with weight `strength` until `end_step`, then prune it.

    types / include / ignore choose the layers as in prunekit.prune (default: every Linear and Conv).
    """

    def __init__(self, model: nn.Module, sparsity: float, end_step: int, *, strength: float = 1e-4,
                 granularity: str = "weight", start_step: int = 0, types: Any = ("linear", "conv"),
                 include: Any = None, ignore: Any = None, via_hooks: bool = True) -> None:
        _, self.sparsity, self.start_step, self.end_step, _ = check_schedule(
            0.0, sparsity, start_step, end_step, 1, ("initial_sparsity", "sparsity", "start_step", "end_step",
                                                     "frequency"))
        self.strength = check_real(strength, "strength", 0.0, math.inf, high_open=True,
                                   meaning="the penalty's weight (0 = no regularisation)")
        if granularity not in GRANULARITIES:
            raise unknown_choice("granularity", granularity, GRANULARITIES)
        if not isinstance(via_hooks, bool):
            raise ArgumentError("via_hooks", via_hooks, "True (gradient hooks add the penalty) or False (add "
                                "penalty() to the loss yourself)")
        self.model, self.granularity, self.via_hooks = model, granularity, via_hooks
        self.targets = targets_of(model, types, include, ignore)
        self.pruned: list[torch.Tensor] | None = None  # per layer, True where the mask will prune
        self._hooks: list[Any] = []
        self.current_step = 0
        self.done = False

    def choose_mask(self) -> list[torch.Tensor]:
        """What each layer will lose: its smallest |w|, or its output channels of smallest L2 norm."""
        if self.granularity == "weight":
            return [lowest(t.weight.abs(), n) for t, n in zip(self.targets, layer_counts(self.targets, self.sparsity))]
        chosen = []
        for target in self.targets:
            w = target.weight.detach()
            rows = lowest(row_norms(w), round(self.sparsity * w.shape[0]))
            chosen.append(rows.reshape(-1, *([1] * (w.dim() - 1))).expand_as(w).clone())
        return chosen

    def penalty(self) -> torch.Tensor:
        """The regulariser as a differentiable scalar: strength * (sum |w| or sum of channel norms) over the pruned."""
        if self.pruned is None:
            return torch.zeros(())
        total = torch.zeros((), dtype=torch.float32)
        for target, pruned in zip(self.targets, self.pruned):
            w = target.weight
            if self.granularity == "weight":
                term = (w.abs() * pruned).sum()
            else:
                term = row_norms(w * pruned).sum()
            total = total + term.float().cpu()
        return self.strength * total

    def _install(self) -> None:
        self.pruned = self.choose_mask()
        if not self.via_hooks:
            return
        for target, pruned in zip(self.targets, self.pruned):
            weight = target.weight
            hook = weight.register_hook(
                lambda grad, w=weight, p=pruned: grad + penalty_gradient(w, p, self.strength, self.granularity))
            self._hooks.append(hook)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def prune_now(self) -> None:
        """Stop regularising and mask what the penalty was driving to zero."""
        if self.pruned is None:
            self.pruned = self.choose_mask()
        self._remove_hooks()
        for target, pruned in zip(self.targets, self.pruned):
            attach_keeping(target, ~pruned)
        self.done = True

    def on_train_begin(self) -> None:
        """Start regularising when training starts at or after start_step."""
        self.on_step_end(self.current_step)

    def on_step_end(self, step: int) -> None:
        """Fix the mask and start the penalty at start_step; prune at end_step."""
        self.current_step = check_step(step, "step")
        if self.done:
            return
        if step >= self.end_step:
            self.prune_now()
        elif step >= self.start_step and self.pruned is None:
            self._install()
