"""ISS-P, iterative soft shrinkage-percentage (Wang, Wang, Zhang, Fu & Tao 2023, Iterative Soft Shrinkage Learning
for Efficient Image Super-Resolution, ICCV).

Instead of zeroing the weights a pruning step selects, ISS-P multiplies them by a shrink factor and leaves them
trainable: a weight selected by mistake keeps part of its value and its gradient, so it can grow back and leave the
selection at a later step. The share selected in each layer (smallest |w|, layer by layer) follows Zhu & Gupta's
cubic schedule; at `end_step` the selection at the final sparsity becomes a hard mask (the paper's frozen mask for
fine-tuning). With shrink=0 each step zeroes exactly the weights hard gradual magnitude pruning would prune.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .callbacks import PruningCallback
from .common import attach_keeping, check_real, layer_counts, lowest, targets_of
from .schedules import check_schedule, check_step, cubic_sparsity


class IterativeSoftShrinkage(PruningCallback):
    """Shrink, every `frequency` steps from `start_step`, the smallest-|w| share of each layer that the cubic
    schedule asks for (by the factor `shrink` in [0, 1)); hard-prune to `final_sparsity` at `end_step`.

    types / include / ignore choose the layers as in prunekit.prune (default: every Linear and Conv).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, end_step: int, *, shrink: float = 0.5,
                 start_step: int = 0, frequency: int = 1, initial_sparsity: float = 0.0,
                 types: Any = ("linear", "conv"), include: Any = None, ignore: Any = None) -> None:
        (self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step,
         self.frequency) = check_schedule(initial_sparsity, final_sparsity, start_step, end_step, frequency,
                                          ("initial_sparsity", "final_sparsity", "start_step", "end_step",
                                           "frequency"))
        self.shrink = check_real(shrink, "shrink", 0.0, 1.0, high_open=True,
                                 meaning="the factor selected weights are multiplied by (0 = hard pruning)")
        self.model = model
        self.targets = targets_of(model, types, include, ignore)
        self.current_step = 0
        self.done = False
        self.history: list[tuple[int, float]] = []  # (step, sparsity selected) of every shrink, then the hard prune

    def scheduled(self, step: int) -> float:
        """The share of each layer selected at `step` (0 before start_step)."""
        if step < self.start_step:
            return 0.0
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start_step, self.end_step,
                              self.frequency)

    def is_shrink_step(self, step: int) -> bool:
        """Whether `step` is on the schedule's grid (start_step + k * frequency) before end_step."""
        return self.start_step <= step < self.end_step and (step - self.start_step) % self.frequency == 0

    @torch.no_grad()
    def shrink_now(self, sparsity: float) -> None:
        """Multiply the `sparsity` share of smallest |w| in every layer by the shrink factor."""
        for target, count in zip(self.targets, layer_counts(self.targets, sparsity)):
            weight = target.weight
            chosen = lowest(weight.abs(), count)
            weight[chosen] = weight[chosen] * self.shrink

    def hard_prune(self) -> None:
        """Mask the final_sparsity share of smallest |w| in every layer; the mask engine keeps them at zero."""
        for target, count in zip(self.targets, layer_counts(self.targets, self.final_sparsity)):
            attach_keeping(target, ~lowest(target.weight.abs(), count))
        self.done = True
        self.history.append((self.current_step, self.final_sparsity))

    def on_train_begin(self) -> None:
        """Apply the schedule at the current step (shrinks at start_step when initial_sparsity > 0)."""
        self.on_step_end(self.current_step)

    def on_step_end(self, step: int) -> None:
        """Shrink on the schedule's grid; hard-prune once end_step is reached."""
        self.current_step = check_step(step, "step")
        if self.done:
            return
        if step >= self.end_step:
            self.hard_prune()
        elif self.is_shrink_step(step) and self.scheduled(step) > 0:
            sparsity = self.scheduled(step)
            self.shrink_now(sparsity)
            self.history.append((step, sparsity))

    def step(self) -> None:
        """Count one more optimizer step and apply the schedule."""
        self.on_step_end(self.current_step + 1)
