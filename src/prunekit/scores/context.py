"""What a score may look at: the model, the chosen weights, and (for data-driven scores) batches and a loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError
from ..selection import Target

DATA_HELP = (
    "a batch (inputs, targets), a dict of model inputs with 'labels', or an iterable (e.g. a DataLoader) of those"
)


@dataclass
class ScoreContext:
    """Inputs every score function receives."""

    model: nn.Module
    targets: list[Target]
    data: Any = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    n_batches: int = 1
    seed: int = 0
    example_inputs: Any = None
    options: dict = field(default_factory=dict)

    def weights(self) -> list[torch.Tensor]:
        """The chosen weights, in target order."""
        return [t.weight for t in self.targets]

    def batches(self, argument: str = "data") -> Iterator[Any]:
        """Up to n_batches batches from `data`, which may be one batch or an iterable of them."""
        if self.data is None:
            raise ArgumentError(argument, None, DATA_HELP, "This score needs data to compute gradients.")
        if _is_single_batch(self.data):
            yield self.data
            return
        count = 0
        for batch in self.data:
            yield batch
            count += 1
            if count >= self.n_batches:
                return
        if count == 0:
            raise ArgumentError(argument, self.data, DATA_HELP, "It yielded no batch.")


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, dict):
        return True
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a plain or transformers model output."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ArgumentError("model output", type(output).__name__, "a tensor of logits or an object with .logits")
    return logits


def batch_loss(model: nn.Module, batch: Any, loss_fn: Callable | None, temperature: float = 1.0) -> torch.Tensor:
    """The loss of one batch: loss_fn(output, targets), cross-entropy by default, or a transformers model's .loss."""
    device = next(model.parameters()).device
    if isinstance(batch, dict):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        output = model(**inputs)
        if loss_fn is not None:
            return loss_fn(output, inputs.get("labels"))
        if temperature == 1.0 and getattr(output, "loss", None) is not None:
            return output.loss
        if "labels" not in inputs:
            raise ArgumentError("data", sorted(batch), "a dict of model inputs that includes 'labels'")
        return _cross_entropy(logits_of(output) / temperature, inputs["labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        output = model(x.to(device))
        if loss_fn is not None:
            return loss_fn(output, y.to(device))
        return _cross_entropy(logits_of(output) / temperature, y.to(device))
    raise ArgumentError("data", type(batch).__name__, DATA_HELP)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Causal LMs: predict token t+1 from t; classifiers: one label per example.
    if logits.dim() == 3 and labels.dim() == 2:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return F.cross_entropy(logits, labels)
