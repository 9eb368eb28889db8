"""Data-free scores: magnitude and random."""

from __future__ import annotations

import torch

from . import register_score
from .context import ScoreContext


@register_score("magnitude", needs_data=False)
def magnitude(ctx: ScoreContext) -> list[torch.Tensor]:
    """|w| (Han et al. 2015)."""
    return [w.detach().abs().float() for w in ctx.weights()]


@register_score("random", needs_data=False)
def random(ctx: ScoreContext) -> list[torch.Tensor]:
    """Uniform random scores from a seeded generator (the baseline every method must beat)."""
    generator = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(w.shape, generator=generator).to(w.device) for w in ctx.weights()]
