"""Lottery tickets: iterative magnitude pruning with weight rewinding.

Frankle & Carbin 2019 (The Lottery Ticket Hypothesis) rewind the surviving weights to their initial values; Frankle
et al. 2020 (Linear Mode Connectivity and the Lottery Ticket Hypothesis) rewind to the values of an early step k,
which finds tickets in deeper networks. One round: train, prune a share `rate` of the remaining weights globally by
magnitude (prunekit.prune, earlier masks kept), rewind the survivors to theta_k; after n rounds the density of the
pruned weights is (1 - rate)^n.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import ArgumentError
from ..methods import get_method
from ..report import Report
from .callbacks import PruningCallback, _check_prune_kwargs, prune_keeping_masks, selection_counts
from .schedules import check_rate, check_step

TrainFn = Callable[[nn.Module, Sequence[PruningCallback]], Any]


class LotteryTicket(PruningCallback):
    """Iterative magnitude pruning with rewinding to the weights of step `rewind_step` (0: the initialisation).

    As a callback in the first round's training it saves theta_k (a copy of the whole state dict: weights and
    buffers) when step `rewind_step` ends; ``prune_round()`` then prunes and ``rewind()`` loads theta_k back, masked
    weights staying zero. ``run(rounds, train_fn)`` does all of it. Remaining keywords go to prunekit.prune
    (include, ignore, types, min_keep, ...); `method` is global magnitude as in the papers.
    """

    def __init__(self, model: nn.Module, rate: float = 0.2, rewind_step: int = 0, *,
                 method: str = "global-magnitude", **prune_kwargs: Any) -> None:
        self.rate = check_rate(rate)
        self.rewind_step = check_step(rewind_step, "rewind_step")
        self.method = get_method(method).name
        _check_prune_kwargs(prune_kwargs, "LotteryTicket")
        self.model = model
        self.prune_kwargs = prune_kwargs
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.rounds_done = 0
        self.steps_seen = 0
        pruned, total = selection_counts(model, **prune_kwargs)
        self.start_density = 1.0 - pruned / total  # densities are relative to this (1 for a dense model)
        self.densities: list[float] = [self.start_density]  # measured after each round, from the masks
        self.reports: list[Report] = []

    # -- theta_k ------------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Save the model's current state as the rewind point theta_k."""
        self.rewind_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def on_train_begin(self) -> None:
        """With rewind_step=0, theta_0 is the state training starts from."""
        if self.rewind_state is None and self.rewind_step == 0:
            self.save()

    def on_step_end(self, step: int) -> None:
        """Save theta_k once, when the first step at or after rewind_step ends."""
        self.steps_seen = max(self.steps_seen, step)
        if self.rewind_state is None and step >= self.rewind_step:
            self.save()

    def _require_rewind_point(self) -> None:
        if self.rewind_state is None:
            raise ArgumentError("rewind_step", self.rewind_step,
                                f"a step the first round reaches (the ticket saw {self.steps_seen} steps)",
                                "Pass the ticket to the training loop as a callback so it can save theta_k.")

    def rewind(self) -> None:
        """Load theta_k into the model: the survivors get their step-k values exactly, masked weights stay 0."""
        self._require_rewind_point()
        with torch.no_grad():
            self.model.load_state_dict(self.rewind_state)  # the mask engine re-zeroes masked weights on load

    # -- pruning ------------------------------------------------------------------------------------------------

    def target_density(self, rounds: int | None = None) -> float:
        """The density the schedule asks for after `rounds` rounds (default: the rounds done)."""
        rounds = self.rounds_done if rounds is None else check_step(rounds, "rounds")
        return self.start_density * (1.0 - self.rate) ** rounds

    def prune_round(self) -> Report:
        """Prune `rate` of the remaining weights globally by magnitude; what earlier rounds pruned stays pruned."""
        self._require_rewind_point()
        sparsity = 1.0 - self.target_density(self.rounds_done + 1)
        report = prune_keeping_masks(self.model, self.method, sparsity, **self.prune_kwargs)
        self.rounds_done += 1
        pruned, total = selection_counts(self.model, **self.prune_kwargs)
        self.densities.append(1.0 - pruned / total)
        self.reports.append(report)
        return report

    @property
    def density(self) -> float:
        """The density of the pruned weights now, measured from the masks."""
        return self.densities[-1]

    def run(self, rounds: int, train_fn: TrainFn, train_last: bool = False) -> list[float]:
        """`rounds` times: train_fn(model, [self]), prune, rewind; with `train_last`, train the final ticket too.

        train_fn trains the model in place and must pass the callbacks it gets to its loop (``fit`` takes them as
        `callbacks=`) so the ticket sees the steps and can save theta_k in the first round; it builds a fresh
        optimizer each time (the papers reset it with the weights). Returns the densities, one per round, after
        the model's starting one.
        """
        rounds = check_step(rounds, "rounds", minimum=1)
        for _ in range(rounds):
            train_fn(self.model, [self])
            self.prune_round()
            self.rewind()
        if train_last:
            train_fn(self.model, [self])
        return list(self.densities)
