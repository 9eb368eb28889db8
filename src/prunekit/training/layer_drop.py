"""Layer pruning at initialisation: remove whole residual blocks before training, by a data-free or one-batch
criterion computed at initialisation.

Criteria, both from pruning at initialisation lifted from weights to blocks:
- 'synflow' (data-free; Tanaka et al. 2020, Pruning neural networks without any data by iteratively conserving
  synaptic flow): the share of the synaptic flow R (the summed output of the |w| network on an all-ones input) that
  runs through the block's residual branch, 1 - R(block replaced by identity) / R. Summing SynFlow scores over a
  block would not do: synaptic flow is conserved, so every layer's scores sum to the same R.
- 'snip' (one batch; Lee et al. 2019, SNIP: Single-shot Network Pruning based on Connection Sensitivity): the
  block's summed connection sensitivity |g w|.
The `count` residual blocks with an identity shortcut (found by prunekit.graph.depth) that score lowest are
replaced by nn.Identity: the network is shallower from the first step and its output shape stays.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ArgumentError, unknown_choice
from ..graph.depth import find_residual_blocks, replace_with_identity
from ..scores.context import batch_loss
from ..scores.context import logits_of
from ..scores.gradient import require_gradients
from ..scores.synflow import _ones_like_input
from .callbacks import PruningCallback, _first_inputs
from .common import targets_of

BLOCK_CRITERIA = ("synflow", "snip")


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def _one_batch(data: Any) -> Any:
    """One batch: `data` itself when it is an (inputs, labels) pair or a dict, else its first item."""
    if isinstance(data, dict) or (isinstance(data, (tuple, list)) and len(data) == 2
                                  and isinstance(data[0], torch.Tensor)):
        return data
    return next(iter(data))


@torch.no_grad()
def synaptic_flow_total(model: nn.Module, example_inputs: Any, without: str | None = None) -> float:
    """R: the summed output of the model with every parameter and buffer made |x| (float64, on a copy) fed all
    ones; with `without`, that block replaced by nn.Identity first."""
    linear = copy.deepcopy(model).double().eval()
    if without is not None:
        replace_with_identity(linear, [without])
    for tensor in [*linear.parameters(), *linear.buffers()]:
        if torch.is_floating_point(tensor):
            tensor.abs_()
    device = next(linear.parameters()).device
    return float(logits_of(linear(_ones_like_input(example_inputs).to(device))).sum())


def block_scores(model: nn.Module, blocks: list[str], criterion: str = "synflow", example_inputs: Any = None,
                 data: Any = None, loss_fn: Callable | None = None) -> dict[str, float]:
    """Each block's share of the synaptic flow, or its summed SNIP score (the model is left unchanged)."""
    if criterion not in BLOCK_CRITERIA:
        raise unknown_choice("criterion", criterion, BLOCK_CRITERIA)
    if criterion == "synflow":
        total = synaptic_flow_total(model, example_inputs)
        return {block: 1.0 - synaptic_flow_total(model, example_inputs, without=block) / total for block in blocks}
    targets = [t for t in targets_of(model) if any(_inside(t.name, b) for b in blocks)]
    if data is None:
        raise ArgumentError("data", None, "one (inputs, labels) batch: SNIP needs a loss to differentiate")
    batch = _one_batch(data)
    weights = [t.weight for t in targets]
    was_training = model.training
    model.eval()  # BatchNorm statistics stay as initialised
    try:
        grads = torch.autograd.grad(batch_loss(model, batch, loss_fn), weights, allow_unused=True)
    finally:
        model.train(was_training)
    grads = require_gradients(grads, [t.name for t in targets], "criterion 'snip'",
                              remedy="leave that block out of blocks=[...]")
    scores = [(w.detach() * g).abs() for w, g in zip(weights, grads)]
    masses = {block: 0.0 for block in blocks}
    for target, score in zip(targets, scores):
        for block in blocks:
            if _inside(target.name, block):
                masses[block] += float(score.double().sum())
    return masses


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder stack of a transformers model, or None for any other model."""
    if "transformers" not in sys.modules:  # no transformers model can exist without the library loaded
        return None
    from ..graph.prune import is_transformers_model

    if not is_transformers_model(model):
        return None
    from ..hf import find_decoder_blocks

    return find_decoder_blocks(model)


class LayerDropAtInit(PruningCallback):
    """Before training, replace the `count` residual blocks of lowest SynFlow flow share (data-free) or SNIP mass
    (one batch) by nn.Identity.

    example_inputs: an input batch (its shape is what SynFlow and the block search use), else taken from `data`.
    blocks: candidate block names (default: every residual block with an identity shortcut that keeps its shape;
    for a transformers decoder, its decoder layers, scored by SNIP on `data` and deleted from the stack with the
    config updated, as prunekit's ShortGPT block removal does).
    skip_untraceable: leave modules torch.fx cannot trace (so whether they are residual blocks is unknown) out of
    the default candidates instead of raising TraceError; they are listed in `skipped`.
    The optimizer may be built before (the removed blocks' parameters simply get no gradient again).
    """

    def __init__(self, model: nn.Module, count: int, criterion: str = "synflow", *, example_inputs: Any = None,
                 data: Any = None, blocks: list[str] | None = None, loss_fn: Callable | None = None,
                 skip_untraceable: bool = False) -> None:
        if criterion not in BLOCK_CRITERIA:
            raise unknown_choice("criterion", criterion, BLOCK_CRITERIA)
        if not isinstance(skip_untraceable, bool):
            raise ArgumentError("skip_untraceable", skip_untraceable, "True or False")
        if criterion == "synflow" and loss_fn is not None:
            raise ArgumentError("loss_fn", type(loss_fn).__name__, "None with criterion 'synflow' (data-free: no "
                                "loss is computed)")
        if criterion == "synflow" and data is not None and example_inputs is not None:
            raise ArgumentError("data", type(data).__name__, "None with criterion 'synflow' and example_inputs "
                                "given (SynFlow takes only an input shape, from example_inputs)")
        self.decoder = _decoder_blocks(model)  # (name, blocks) of a transformers decoder stack, else None
        if self.decoder is not None:
            if criterion != "snip":
                raise ArgumentError("criterion", criterion, "'snip' for a transformers decoder (SynFlow's all-ones "
                                    "input has no meaning for token ids)")
            if data is None:
                raise ArgumentError("data", None, "one batch of model inputs with 'labels' (SNIP needs a loss)")
            if blocks is None:
                blocks = [f"{self.decoder[0]}.{i}" for i in range(len(self.decoder[1]))]
        elif example_inputs is None:
            if data is None:
                raise ArgumentError("example_inputs", None, "an input batch, or data to take one from")
            example_inputs = _first_inputs(data)
        if criterion == "snip" and data is None:
            raise ArgumentError("data", None, "one (inputs, labels) batch: SNIP needs a loss to differentiate")
        self.model, self.criterion, self.example_inputs, self.data, self.loss_fn = (
            model, criterion, example_inputs, data, loss_fn)
        if skip_untraceable and (blocks is not None or self.decoder is not None):
            raise ArgumentError("skip_untraceable", skip_untraceable, "False when the candidates are not searched "
                                "by tracing (blocks given, or a transformers decoder's layers)")
        self.skipped: list[str] = []  # untraceable modules left out of the candidates (skip_untraceable=True)
        if blocks is not None:
            self.candidates = list(blocks)
        else:
            self.candidates, self.skipped = find_residual_blocks(model, example_inputs, skip_untraceable)
        known = dict(model.named_modules())
        for name in self.candidates:
            if not name or name not in known:
                raise ArgumentError("blocks", name, "names of submodules of the model")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or (
                count and count >= len(self.candidates)):
            raise ArgumentError("count", count, f"an integer from 0 to {max(0, len(self.candidates) - 1)} (the "
                                f"model has {len(self.candidates)} removable residual blocks; one must stay)")
        self.count = count
        self.scores: dict[str, float] = {}
        self.removed: list[str] | None = None

    def apply(self) -> list[str]:
        """Score the blocks and remove the `count` lightest (once; later calls return the same names)."""
        if self.removed is None:
            self.scores = block_scores(self.model, self.candidates, self.criterion, self.example_inputs, self.data,
                                       self.loss_fn)
            chosen = sorted(self.candidates, key=lambda n: (self.scores[n], self.candidates.index(n)))[:self.count]
            if self.decoder is not None and all(n.rpartition(".")[0] == self.decoder[0] for n in chosen):
                from ..graph.transformers import remove_blocks

                # Deleted from the stack (config and KV-cache layer numbers follow), not left as identities.
                remove_blocks(self.model, [int(n.rpartition(".")[2]) for n in chosen])
                self.removed = chosen
            else:
                self.removed = replace_with_identity(self.model, chosen)
        return self.removed

    def on_train_begin(self) -> None:
        """Drop the blocks before the first step."""
        self.apply()
