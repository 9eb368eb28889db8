"""SynFlow (Tanaka et al. 2020): data-free synaptic flow, |w * dR/dw| with R the summed output of the linearised net.

The network is linearised by taking |w| of every parameter and fed an all-ones input, in float64 on a copy, so the
caller's model is never touched. Applied iteratively by the method (100 rounds, exponential schedule).
"""

from __future__ import annotations

import copy

import torch

from ..errors import ArgumentError
from . import register_score
from .context import ScoreContext, logits_of
from .gradient import require_gradients


def _ones_like_input(example_inputs) -> torch.Tensor:
    if isinstance(example_inputs, (tuple, list)) and example_inputs and isinstance(example_inputs[0], torch.Tensor):
        example_inputs = example_inputs[0]
    if not isinstance(example_inputs, torch.Tensor) or not torch.is_floating_point(example_inputs):
        raise ArgumentError(
            "example_inputs", type(example_inputs).__name__,
            "a float tensor with the model's input shape (only its shape is used; SynFlow is data-free)",
        )
    return torch.ones((1, *example_inputs.shape[1:]), dtype=torch.float64)


def synaptic_flow(model: torch.nn.Module, names: list[str], example_inputs) -> tuple[list[torch.Tensor], float]:
    """Scores |w * dR/dw| for the named modules' weights, and R itself."""
    linear = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in linear.parameters():
            p.abs_()
        for b in linear.buffers():
            if torch.is_floating_point(b):
                b.abs_()
    modules = dict(linear.named_modules())
    weights = [modules[n].weight for n in names]
    for p in linear.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    device = weights[0].device
    output = logits_of(linear(_ones_like_input(example_inputs).to(device)))
    total = output.sum()
    grads = require_gradients(torch.autograd.grad(total, weights, allow_unused=True), names, "score 'synflow'",
                              source="the synaptic flow R", remedy="leave the module out with ignore=[...]")
    scores = [(w * g).detach().abs() for w, g in zip(weights, grads)]
    return scores, float(total.detach())


@register_score("synflow", needs_data=False)
def synflow(ctx: ScoreContext) -> list[torch.Tensor]:
    """One round of SynFlow scores (float64, on a copy of the model)."""
    scores, _ = synaptic_flow(ctx.model, [t.name for t in ctx.targets], ctx.example_inputs)
    return scores
