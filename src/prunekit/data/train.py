"""Training a small image classifier for a fixed number of steps, recording what the data-pruning scores need:
forgetting events at every presentation, an early snapshot for EL2N/GraNd, and penultimate features as embeddings.
Optionally distils from a teacher ((1 - alpha) CE + alpha T^2 KL, prunekit.distill.distillation_loss)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distill import distillation_loss
from ..errors import ArgumentError
from .checks import check_count
from .scores import ForgettingTracker


class SmallCNN(nn.Module):
    """Conv(16)-ReLU-MaxPool, Conv(32)-ReLU-MaxPool, adaptive pooling to 4x4, Linear(512, 128)-ReLU, Linear(128, C).

    Works for any image size >= 4x4 (8x8 digits, 28x28 Fashion-MNIST); `embed` returns the 128-d features.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, features: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, features), nn.ReLU(),
        )
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes)."""
        return self.classifier(self.features(x))


@dataclass
class TrainResult:
    """A finished run: the model, optional early snapshot, forgetting tracker and the loss of the last steps."""

    model: nn.Module
    snapshot: nn.Module | None = None
    tracker: ForgettingTracker | None = None
    steps: int = 0
    final_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)


def _order(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0, teacher: nn.Module | None = None, alpha: float = 0.5,
                temperature: float = 4.0, track_forgetting: bool = False, snapshot_step: int | None = None,
                progress: bool = True) -> TrainResult:
    """Adam for exactly `steps` mini-batches over reshuffled epochs of (x, y); the same budget whatever len(x) is.

    With a teacher the loss is (1 - alpha) CE + alpha T^2 KL(teacher || student). track_forgetting records each
    example's correctness at each presentation (from the training forward pass, as Toneva et al. do);
    snapshot_step keeps a copy of the model after that many steps (for EL2N / GraNd early in training).
    """
    from tqdm import tqdm

    check_count(steps, "steps")
    check_count(batch_size, "batch_size")
    if len(x) != len(y) or len(x) == 0:
        raise ArgumentError("y", f"{len(y)} labels", f"one label per training example ({len(x)} examples, >= 1)")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    result = TrainResult(model=model, tracker=ForgettingTracker(len(x)) if track_forgetting else None)
    if teacher is not None:
        teacher.eval()
    model.train()
    order, cursor = _order(len(x), generator), 0
    for step in tqdm(range(steps), desc="training", unit="step", file=sys.stderr, disable=None if progress else True,
                     leave=False):
        if cursor >= len(order):
            order, cursor = _order(len(x), generator), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        logits = model(x[idx])
        if teacher is None:
            loss = F.cross_entropy(logits, y[idx])
        else:
            with torch.no_grad():
                teacher_logits = teacher(x[idx])
            loss = distillation_loss(logits, teacher_logits, y[idx], temperature=temperature, alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if result.tracker is not None:
            result.tracker.update(idx.numpy(), (logits.detach().argmax(1) == y[idx]).numpy())
        result.losses.append(loss.item())
        if snapshot_step is not None and step + 1 == snapshot_step:
            result.snapshot = copy.deepcopy(model).eval()
    result.steps = steps
    result.final_loss = float(np.mean(result.losses[-50:]))
    model.eval()
    return result


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of every example, in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(part) for part in x.split(batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of examples classified correctly."""
    return float((predict(model, x).argmax(1) == y).float().mean())


@torch.no_grad()
def penultimate(model: SmallCNN, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """The 128-d features before the classifier, as float32 numpy."""
    model.eval()
    return torch.cat([model.features(part) for part in x.split(batch_size)]).numpy().astype(np.float32)
