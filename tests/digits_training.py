"""Shared pieces of the training-time pruning tests: real digits split into train/test, seeded batch orders, a small
MLP, and a module fixture that runs those tiny models on one intra-op thread."""

from __future__ import annotations

import pytest
import torch
from torch import nn

N_TRAIN, BATCH = 1024, 32  # 32 steps an epoch of real digits; an epoch takes ~20 ms on one thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine thread hand-offs cost 100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def digits_split(n_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): N_TRAIN training images and n_test held out, in a seeded order."""
    from prunekit.datasets import load_digits_tensors

    x, y = load_digits_tensors()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:N_TRAIN], order[N_TRAIN:N_TRAIN + n_test]
    return x[train], y[train], x[test], y[test]


def batches_of(digits, seed: int = 0):
    """A function epoch -> shuffled (inputs, labels) batches, a new order each epoch."""
    x, y = digits[0], digits[1]

    def make(epoch: int):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100 + epoch))
        return [(x[i], y[i]) for i in order.split(BATCH)]

    return make


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
