"""Small models shared by the tests (architectures built here, seeded)."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn(seed: int = 0, bias: bool = True) -> nn.Module:
    """Conv -> BN -> ReLU -> Conv -> ReLU -> pool -> Linear, sized so 2:4 and 4x1 fit every layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3, bias=bias), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, bias=bias), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 12, bias=bias),
    )


def small_mlp(seed: int = 0, bias: bool = True, widths: tuple[int, ...] = (16, 32, 24, 8)) -> nn.Sequential:
    """A ReLU MLP."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn_batch(seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels for small_cnn."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 10, 10, generator=g), torch.randint(0, 12, (n,), generator=g)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the state dict, for 'model untouched' checks."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """Whether the model's state equals a saved copy exactly."""
    current = model.state_dict()
    return current.keys() == saved.keys() and all(torch.equal(current[k], saved[k]) for k in saved)
