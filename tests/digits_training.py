"""Shared pieces of the training-time pruning tests: real digits split into train/test, seeded batch orders, a small
MLP (the one-thread fixture those tiny models use is conftest.one_intra_op_thread)."""

from __future__ import annotations

import torch
from torch import nn

N_TRAIN, BATCH = 1024, 32  # 32 steps an epoch of real digits; an epoch takes ~20 ms on one thread



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
