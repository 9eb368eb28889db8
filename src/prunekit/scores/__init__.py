"""Importance scores: weight-shaped tensors, higher = more important. Pure where the paper allows it.

Each score is a function ``(ctx: ScoreContext) -> list[Tensor]`` registered under a name; the list is aligned with
``ctx.targets`` and every tensor has its weight's shape.
"""

from __future__ import annotations

from typing import Callable

import torch

from .context import ScoreContext

ScoreFn = Callable[[ScoreContext], list[torch.Tensor]]
SCORES: dict[str, ScoreFn] = {}
DATA_FREE: set[str] = set()
NEEDS_EXAMPLE = frozenset({"synflow"})  # data-free, but runs the model on example_inputs (for their shape)
ONE_BATCH = frozenset({"snip"})  # defined on exactly one minibatch (Lee et al. 2019): n_batches > 1 is refused


def batches_for(score: str, available: int) -> int:
    """How many of a preset's `available` calibration batches `score` takes: all, or 1 where it is defined on one."""
    return 1 if score in ONE_BATCH else available


def register_score(name: str, needs_data: bool) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under `name`."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = fn
        if not needs_data:
            DATA_FREE.add(name)
        return fn

    return wrap


from . import basic, gradient, synflow  # noqa: E402,F401  (registration side effects)

__all__ = ["SCORES", "DATA_FREE", "NEEDS_EXAMPLE", "ONE_BATCH", "ScoreContext", "batches_for", "register_score"]
