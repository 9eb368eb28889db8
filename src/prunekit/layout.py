"""Every weight viewed as an (outputs x inputs) matrix, so patterns are written once.

Columns are ordered with the input channel fastest, so that groups of M consecutive columns are M consecutive
input channels at one kernel position: the convention of N:M sparse tensor cores (and of NVIDIA's ASP).
"""

from __future__ import annotations

import torch

from .selection import CONV, EMBEDDING, HF_CONV1D, LINEAR


def to_matrix(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """A weight-shaped tensor as an (outputs, inputs) matrix (a copy only where a permute needs one)."""
    if kind in (LINEAR, EMBEDDING):
        return tensor
    if kind == HF_CONV1D:  # stored (in, out)
        return tensor.t()
    if kind == CONV:  # (out, in/groups, *kernel) -> (out, *kernel, in/groups) -> (out, kernel*in)
        dims = tensor.dim()
        return tensor.permute(0, *range(2, dims), 1).reshape(tensor.shape[0], -1)
    raise ValueError(f"unknown weight kind {kind!r}")


def from_matrix(matrix: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
    """Invert to_matrix: back to the weight's own shape."""
    if kind in (LINEAR, EMBEDDING):
        return matrix.reshape(shape)
    if kind == HF_CONV1D:
        return matrix.t().reshape(shape)
    if kind == CONV:
        out, cin, *kernel = shape
        dims = len(shape)
        return matrix.reshape(out, *kernel, cin).permute(0, dims - 1, *range(1, dims - 1)).contiguous()
    raise ValueError(f"unknown weight kind {kind!r}")


def matrix_shape(shape: torch.Size, kind: str) -> tuple[int, int]:
    """The (outputs, inputs) shape of to_matrix without touching data."""
    if kind == HF_CONV1D:
        return shape[1], shape[0]
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


def input_channels(shape: torch.Size, kind: str) -> int:
    """The size of the input dimension along which N:M groups run (per group for grouped convs)."""
    if kind == HF_CONV1D:
        return shape[0]
    return shape[1]
