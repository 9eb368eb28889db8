"""Gradient-based scores: first/second-order Taylor, SNIP and GraSP.

Gradients are taken with torch.autograd.grad on the chosen weights only, so the model's .grad fields and
requires_grad flags are left exactly as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from . import register_score
from .context import ScoreContext, batch_loss


@contextlib.contextmanager
def _requiring_grad(weights: list[torch.Tensor]) -> Iterator[None]:
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def _grad(loss: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, weights, allow_unused=True, create_graph=create_graph)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


def accumulated_gradients(ctx: ScoreContext, temperature: float = 1.0) -> list[torch.Tensor]:
    """dL/dw summed over ctx.n_batches batches (averaged, so the scale does not depend on the count)."""
    weights = ctx.weights()
    total = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    with _requiring_grad(weights):
        for batch in ctx.batches():
            grads = _grad(batch_loss(ctx.model, batch, ctx.loss_fn, temperature), weights)
            for acc, g in zip(total, grads):
                acc += g.detach().float()
            count += 1
    return [g / count for g in total]


@register_score("taylor", needs_data=True)
def taylor(ctx: ScoreContext) -> list[torch.Tensor]:
    """Taylor expansion of the loss change when a weight is removed (Molchanov et al. 2017/2019).

    order 1: |w g|; order 2 adds the Fisher-approximated curvature term: |-w g + (w g)^2 / 2|.
    """
    order = ctx.options.get("taylor_order", 1)
    grads = accumulated_gradients(ctx)
    scores = []
    for w, g in zip(ctx.weights(), grads):
        wg = w.detach().float() * g
        scores.append(wg.abs() if order == 1 else (-wg + 0.5 * wg**2).abs())
    return scores


@register_score("snip", needs_data=True)
def snip(ctx: ScoreContext) -> list[torch.Tensor]:
    """SNIP (Lee et al. 2019): connection sensitivity |g * w| on one batch at initialisation."""
    return [(w.detach().float() * g).abs() for w, g in zip(ctx.weights(), accumulated_gradients(ctx))]


@register_score("grasp", needs_data=True)
def grasp(ctx: ScoreContext) -> list[torch.Tensor]:
    """GraSP (Wang et al. 2020): keep weights whose removal least reduces gradient flow; importance = w * Hg.

    The paper removes the largest -w*Hg; as an importance (higher = keep) that is w*Hg. Logits are divided by
    a temperature (200 in the paper) so the Hessian is not dominated by saturated softmaxes.
    """
    temperature = ctx.options.get("grasp_temperature", 200.0)
    weights = ctx.weights()
    g_stop = [g.to(w.dtype) for g, w in zip(accumulated_gradients(ctx, temperature), weights)]
    hg = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    with _requiring_grad(weights):
        for batch in ctx.batches():
            grads = _grad(batch_loss(ctx.model, batch, ctx.loss_fn, temperature), weights, create_graph=True)
            z = sum((g * gs).sum() for g, gs in zip(grads, g_stop))
            for acc, h in zip(hg, _grad(z, weights)):
                acc += h.detach().float()
            count += 1
    return [w.detach().float() * h / count for w, h in zip(weights, hg)]
