"""Gradient-based scores: first/second-order Taylor, SNIP and GraSP.

Gradients are taken with torch.autograd.grad on the chosen weights only, so the model's .grad fields and
requires_grad flags are left exactly as they were.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import ArgumentError, ModelError
from . import register_score
from .context import ScoreContext, batch_loss

TAYLOR_ORDERS = (1, 2)


@contextlib.contextmanager
def requiring_grad(weights: list[torch.Tensor]) -> Iterator[None]:
    """Let autograd differentiate `weights` for a while; their requires_grad flags are restored after."""
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def _names(ctx: ScoreContext) -> list[str]:
    return [f"{t.name}.{t.param_name}" if t.name else t.param_name for t in ctx.targets]


def _grad(loss: torch.Tensor, weights: list[torch.Tensor], names: list[str], score: str,
          create_graph: bool = False) -> list[torch.Tensor]:
    """dloss/dw for every weight; a weight the loss does not reach is an error, not a zero score."""
    grads = torch.autograd.grad(loss, weights, allow_unused=True, create_graph=create_graph)
    return require_gradients(grads, names, f"score {score!r}")


def require_gradients(grads, names: list[str], what: str, source: str = "the loss",
                      remedy: str = "leave it out with ignore=[...] or include=[...]") -> list[torch.Tensor]:
    """autograd.grad(..., allow_unused=True)'s results, with a None (a weight `source` does not reach) an error
    naming the weight: a zero score would silently make it the first to prune."""
    missing = [name for name, g in zip(names, grads) if g is None]
    if missing:
        raise ModelError(f"{what}: {source} gets no gradient from {', '.join(missing)} (the forward pass does not "
                         f"use it), so it cannot be scored; {remedy}")
    return list(grads)


def batch_gradients(ctx: ScoreContext, score: str, temperature: float = 1.0) -> Iterator[list[torch.Tensor]]:
    """dL_b/dw of each calibration batch b in turn (float32, detached), in target order."""
    weights, names = ctx.weights(), _names(ctx)
    with requiring_grad(weights):
        for batch in ctx.batches():
            loss = batch_loss(ctx.model, batch, ctx.loss_fn, temperature)
            yield [g.detach().float() for g in _grad(loss, weights, names, score)]


def accumulated_gradients(ctx: ScoreContext, score: str = "grasp", temperature: float = 1.0) -> list[torch.Tensor]:
    """dL/dw averaged over ctx.n_batches batches (so the scale does not depend on the count)."""
    total: list[torch.Tensor] | None = None
    count = 0
    for grads in batch_gradients(ctx, score, temperature):
        total = grads if total is None else [acc + g for acc, g in zip(total, grads)]
        count += 1
    assert total is not None  # ctx.batches() raises when there is no batch
    return [g / count for g in total]


def _gradient_moments(ctx: ScoreContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """mean_b g_b and mean_b g_b^2 (the empirical Fisher's diagonal), in float64 for the sums."""
    first: list[torch.Tensor] | None = None
    second: list[torch.Tensor] | None = None
    count = 0
    for grads in batch_gradients(ctx, "taylor"):
        g64 = [g.double() for g in grads]
        first = g64 if first is None else [a + g for a, g in zip(first, g64)]
        second = [g * g for g in g64] if second is None else [a + g * g for a, g in zip(second, g64)]
        count += 1
    assert first is not None and second is not None
    return [g / count for g in first], [g / count for g in second]


@register_score("taylor", needs_data=True)
def taylor(ctx: ScoreContext) -> list[torch.Tensor]:
    """Taylor importance of removing each weight, averaged over batches after squaring (Molchanov et al. 2019).

    The change of the loss when w_m is set to 0 is estimated per batch and squared, then averaged over the
    n_batches batches (the paper's per-minibatch averaging); never |w mean_b g_b|, whose sign cancels across
    batches at a minimum. taylor_order=1 (the paper's Eq. 3): I_m = mean_b (w_m g_bm)^2.
    taylor_order=2 (Eq. 4, the Hessian's diagonal replaced by the empirical Fisher F_m = mean_b g_bm^2):
    I_m = mean_b (w_m g_bm - F_m w_m^2 / 2)^2.
    """
    order = ctx.options.get("taylor_order", 1)
    if isinstance(order, bool) or order not in TAYLOR_ORDERS:
        raise ArgumentError("taylor_order", order, "1 (first-order Taylor) or 2 (adds the empirical-Fisher curvature)")
    mean_g, fisher = _gradient_moments(ctx)
    scores = []
    for w, g1, g2 in zip(ctx.weights(), mean_g, fisher):
        w = w.detach().double()
        first = w * w * g2  # mean_b (w g_b)^2
        if order == 2:
            # mean_b (w g_b - c)^2 = mean_b (w g_b)^2 - 2 c w mean_b g_b + c^2, with c = F w^2 / 2
            c = 0.5 * g2 * w * w
            first = (first - 2.0 * c * w * g1 + c * c).clamp_min(0.0)  # >= 0 exactly; clamp rounding only
        scores.append(first.float())
    return scores


@register_score("snip", needs_data=True)
def snip(ctx: ScoreContext) -> list[torch.Tensor]:
    """SNIP (Lee et al. 2019): normalised connection sensitivity s_j = |g_j w_j| / sum_k |g_k w_k| on one batch.

    The paper scores one minibatch at initialisation; the sum runs over every weight considered, so all scores
    add up to 1. More than one batch is refused (use 'taylor' to average over batches).
    """
    if ctx.n_batches != 1:
        raise ArgumentError("n_batches", ctx.n_batches, "1: SNIP scores exactly one minibatch (Lee et al. 2019)",
                            "Use method 'taylor' to average gradient importance over several batches.")
    (grads,) = list(batch_gradients(ctx, "snip"))
    sensitivity = [(w.detach().double() * g.double()).abs() for w, g in zip(ctx.weights(), grads)]
    total = sum(float(s.sum()) for s in sensitivity)
    if not total > 0:
        raise ModelError("score 'snip': every gradient times weight is zero on this batch (the loss does not "
                         "depend on the chosen weights), so the sensitivities cannot be normalised")
    return [(s / total).float() for s in sensitivity]


@register_score("grasp", needs_data=True)
def grasp(ctx: ScoreContext) -> list[torch.Tensor]:
    """GraSP (Wang et al. 2020): keep weights whose removal least reduces gradient flow; importance = w * Hg.

    The paper removes the largest -w*Hg; as an importance (higher = keep) that is w*Hg. Logits are divided by
    a temperature (200 in the paper) so the Hessian is not dominated by saturated softmaxes.
    """
    temperature = ctx.options.get("grasp_temperature", 200.0)
    weights, names = ctx.weights(), _names(ctx)
    g_stop = [g.to(w.dtype) for g, w in zip(accumulated_gradients(ctx, "grasp", temperature), weights)]
    hg = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    count = 0
    with requiring_grad(weights):
        for batch in ctx.batches():
            grads = _grad(batch_loss(ctx.model, batch, ctx.loss_fn, temperature), weights, names, "grasp",
                          create_graph=True)
            z = sum((g * gs).sum() for g, gs in zip(grads, g_stop))
            # every weight has a gradient (checked above); a None here means g does not depend on w: Hg = 0 exactly
            second = torch.autograd.grad(z, weights, allow_unused=True)
            for acc, h in zip(hg, second):
                if h is not None:
                    acc += h.detach().float()
            count += 1
    return [w.detach().float() * h / count for w, h in zip(weights, hg)]
