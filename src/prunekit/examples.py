"""The embedded example job: a small CNN trained on scikit-learn's bundled 8x8 digits, then pruned and fine-tuned.

It needs no download (the digits ship inside scikit-learn) and runs in seconds on two CPU cores, so `prunekit demo`
and the tests can show a whole prune -> fine-tune -> measure cycle on real data.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError
from .threads import intra_op_threads

DIGITS_SEED = 0
TEST_SHARE = 0.25
DENSE_EPOCHS = 12
FINETUNE_EPOCHS = 3
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
FINETUNE_LEARNING_RATE = 1e-3


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max pooling and a Linear classifier for 1x8x8 digit images (10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, 10)."""
        return self.classifier(self.features(x).flatten(1))


@dataclass
class DigitsData:
    """The digits as tensors, split once into train and test sets."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int = BATCH_SIZE, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled training batches (a fixed order for a given seed)."""
        order = torch.randperm(len(self.y_train), generator=torch.Generator().manual_seed(seed))
        return [(self.x_train[i], self.y_train[i]) for i in order.split(batch_size)]


def load_digits_data(seed: int = DIGITS_SEED, test_share: float = TEST_SHARE) -> DigitsData:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1], split stratified (75/25 by default) with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # scikit-learn is an optional extra: say which one
        raise ImportError("the digits example needs scikit-learn: pip install 'prunekit[zoo]'") from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    index = torch.arange(len(y)).numpy()
    train, test = train_test_split(index, test_size=test_share, random_state=seed, stratify=y.numpy())
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return DigitsData(x[train], y[train], x[test], y[test])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of correctly classified examples, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)


# The digits batches are tiny (32 images of 8x8): measured on 2 cores, 12 epochs take 1.3 s on one thread vs
# 1.05 s on two when idle, but 3 s vs 30-60 s when the machine is busy; training runs on one thread.


def train(model: nn.Module, data: DigitsData, epochs: int, lr: float = LEARNING_RATE, seed: int = 0,
          progress: bool = False, desc: str = "training") -> float:
    """Train with Adam and cross-entropy; masks attached by prunekit stay enforced. Returns the last epoch's loss."""
    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss_value = float("nan")
    # disable=None: a live bar on a terminal only; logs (CI, pipes) get the caller's plain progress lines instead.
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=None if progress else True, file=sys.stderr,
               leave=False)
    with intra_op_threads(1):
        for epoch in bar:
            loss_value = _epoch(model, optimizer, data.batches(seed=seed * 1000 + epoch))  # a new order each epoch
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def _epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
           batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One pass over the batches; returns the mean training loss."""
    total, count = 0.0, 0
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(y), count + len(y)
    return total / count


def train_dense(data: DigitsData | None = None, epochs: int = DENSE_EPOCHS, seed: int = 0,
                progress: bool = False) -> DigitsCNN:
    """A DigitsCNN trained from a seeded initialisation (same seed, same weights)."""
    data = data or load_digits_data()
    torch.manual_seed(seed)
    model = DigitsCNN()
    train(model, data, epochs, seed=seed, progress=progress, desc="training digits-cnn")
    return model


def calibration_batches(data: DigitsData, n_batches: int = 4, batch_size: int = 64,
                        seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few training batches for data-driven scores (SNIP, GraSP, Taylor, rate-distortion)."""
    return data.batches(batch_size=batch_size, seed=seed + 7)[:n_batches]


def prune_options(data: DigitsData, seed: int = 0, method: str | None = None, score: str | None = None,
                  budget: str | None = None) -> dict[str, Any]:
    """The data arguments `method` (with its score and budget, or the overrides) reads on this model.

    With no method: every one any registered method may need (batches, their count, an input example), for a
    caller to cut with prunekit.api.inputs_for. n_batches is every batch, or 1 for a score defined on one (SNIP).
    """
    from .api import inputs_for

    batches = calibration_batches(data, seed=seed)
    preset = {"data": batches, "n_batches": len(batches), "example_inputs": data.x_train[:1]}
    return preset if method is None else inputs_for(preset, method, score, budget)


def masked_sparsity(model: nn.Module) -> float:
    """Share of zeros in the model's masked weights, counted on the weights themselves (checks masks held)."""
    from .masks import masked_modules

    total = zeros = 0
    for _, module, param_name, _ in masked_modules(model):
        weight = getattr(module, param_name)
        total, zeros = total + weight.numel(), zeros + int((weight == 0).sum())
    return zeros / total if total else 0.0


def run_digits_demo(method: str = "global-magnitude", sparsity: float | None = 0.8,
                    finetune_epochs: int = FINETUNE_EPOCHS, *, dense_epochs: int = DENSE_EPOCHS, seed: int = 0,
                    progress: bool = False, log: Callable[[str], None] | None = None,
                    **prune_kwargs: Any) -> dict[str, Any]:
    """Train DigitsCNN, prune it with prunekit.prune (masks enforced), fine-tune, and measure test accuracy.

    Returns dense_accuracy, pruned_accuracy (right after pruning), finetuned_accuracy (None without fine-tuning),
    final_sparsity (zeros counted after fine-tuning), the Report, the pruned model and the seconds of each step.
    """
    from .api import prune
    from .methods import get_method

    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ArgumentError("finetune_epochs", finetune_epochs, "an integer >= 0")
    get_method(method)  # fail on a bad name before spending seconds on training
    say = log or (lambda message: None)
    timings: dict[str, float] = {}

    started = time.perf_counter()
    data = load_digits_data()
    say(f"training digits-cnn on {len(data.y_train)} digits ({dense_epochs} epochs, seed {seed})")
    model = train_dense(data, epochs=dense_epochs, seed=seed, progress=progress)
    timings["train"] = time.perf_counter() - started
    dense = accuracy(model, data.x_test, data.y_test)
    say(f"dense digits-cnn: test accuracy {100 * dense:.2f}% ({timings['train']:.1f} s)")

    options = {**prune_options(data, seed, method, prune_kwargs.get("score"), prune_kwargs.get("budget")),
               **prune_kwargs}
    model.eval()  # data-driven scores run forward passes: keep BatchNorm statistics as trained
    report = prune(model, method, sparsity, seed=seed, **options)
    timings["prune"] = report.seconds
    pruned = accuracy(model, data.x_test, data.y_test)
    say(f"pruned with {report.method} to {100 * report.sparsity:.1f}%: test accuracy {100 * pruned:.2f}%")

    finetuned = None
    if finetune_epochs:
        started = time.perf_counter()
        train(model, data, finetune_epochs, lr=FINETUNE_LEARNING_RATE, seed=seed + 1, progress=progress,
              desc="fine-tuning")
        timings["finetune"] = time.perf_counter() - started
        finetuned = accuracy(model, data.x_test, data.y_test)
        say(f"fine-tuned {finetune_epochs} epochs with masks enforced: test accuracy {100 * finetuned:.2f}%")

    report.extra.update(model="digits-cnn", accuracy={"dense": dense, "pruned": pruned, "finetuned": finetuned})
    return {
        "method": report.method, "sparsity": report.sparsity, "final_sparsity": masked_sparsity(model),
        "dense_accuracy": dense, "pruned_accuracy": pruned,
        "finetuned_accuracy": finetuned, "finetune_epochs": finetune_epochs, "report": report, "model": model,
        "seconds": timings,
    }
