"""Patterns: what is removed together. Scores (weight-shaped) + a count from the budget -> a boolean keep-mask.

Every pattern works on the (outputs x inputs) matrix view of layout.py:
- ``unstructured``: single elements;
- ``N:M`` (e.g. ``2:4``): in every group of M consecutive inputs of a row, keep the N highest scores;
- ``RxC`` blocks (e.g. ``4x1``: four outputs by one input): a block's score is the sum of its elements' scores.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch

from .errors import ArgumentError, PruneError
from .layout import from_matrix, input_channels, matrix_shape, to_matrix


def bottom_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over a 1-D score vector that drops exactly the k lowest scores (ties broken by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        # A stable sort makes tie-breaking reproducible across runs and thread counts.
        order = torch.sort(scores.reshape(-1), stable=True).indices
        keep[order[:k]] = False
    return keep


@dataclass(frozen=True)
class Unstructured:
    """Single weights."""

    name: str = "unstructured"
    unit_size: int = 1
    fixed_density: float | None = None

    def validate(self, layer: str, shape: torch.Size, kind: str) -> None:
        """Any shape is fine."""

    def units(self, shape: torch.Size, kind: str) -> int:
        """Number of prunable units in a layer of this shape."""
        rows, cols = matrix_shape(shape, kind)
        return rows * cols

    def unit_scores(self, scores: torch.Tensor, kind: str) -> torch.Tensor:
        """One score per unit, as a flat vector."""
        return to_matrix(scores, kind).reshape(-1)

    def mask(self, scores: torch.Tensor, kind: str, n_prune: int) -> torch.Tensor:
        """Weight-shaped keep-mask dropping the n_prune lowest-scoring units."""
        return self.units_mask(self.unit_scores(scores, kind), scores.shape, kind, n_prune)

    def units_mask(self, unit_scores: torch.Tensor, shape: torch.Size, kind: str, n_prune: int) -> torch.Tensor:
        """Weight-shaped keep-mask from per-unit scores."""
        rows, cols = matrix_shape(shape, kind)
        return from_matrix(bottom_k_mask(unit_scores, n_prune).reshape(rows, cols), kind, shape)


@dataclass(frozen=True)
class Blocks:
    """Rectangular blocks of `rows` outputs by `cols` inputs, kept or dropped whole."""

    rows: int
    cols: int

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def unit_size(self) -> int:
        return self.rows * self.cols

    fixed_density = None

    def validate(self, layer: str, shape: torch.Size, kind: str) -> None:
        """The block must tile the layer's matrix exactly."""
        rows, cols = matrix_shape(shape, kind)
        if rows % self.rows or cols % self.cols:
            raise ArgumentError(
                "pattern", self.name,
                f"blocks that tile every layer; layer {layer!r} is {rows} outputs x {cols} inputs "
                f"(outputs must be a multiple of {self.rows} and inputs of {self.cols})",
                "Exclude the layer with ignore=[...] or choose another block shape.",
            )

    def units(self, shape: torch.Size, kind: str) -> int:
        rows, cols = matrix_shape(shape, kind)
        return (rows // self.rows) * (cols // self.cols)

    def unit_scores(self, scores: torch.Tensor, kind: str) -> torch.Tensor:
        matrix = to_matrix(scores, kind)
        rows, cols = matrix.shape
        blocks = matrix.reshape(rows // self.rows, self.rows, cols // self.cols, self.cols)
        return blocks.sum(dim=(1, 3)).reshape(-1)

    def mask(self, scores: torch.Tensor, kind: str, n_prune: int) -> torch.Tensor:
        return self.units_mask(self.unit_scores(scores, kind), scores.shape, kind, n_prune)

    def units_mask(self, unit_scores: torch.Tensor, shape: torch.Size, kind: str, n_prune: int) -> torch.Tensor:
        rows, cols = matrix_shape(shape, kind)
        keep = bottom_k_mask(unit_scores, n_prune)
        keep = keep.reshape(rows // self.rows, 1, cols // self.cols, 1).expand(-1, self.rows, -1, self.cols)
        return from_matrix(keep.reshape(rows, cols), kind, shape)


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity: N of every M consecutive inputs kept, in each row."""

    n: int
    m: int

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    unit_size = 1

    @property
    def fixed_density(self) -> float:
        return self.n / self.m

    def validate(self, layer: str, shape: torch.Size, kind: str) -> None:
        """M must divide the layer's input channels so groups never straddle a kernel position."""
        channels = input_channels(shape, kind)
        if channels % self.m:
            raise ArgumentError(
                "pattern", self.name,
                f"an M that divides every layer's input size; layer {layer!r} has {channels} inputs",
                "Exclude the layer with ignore=[...] or pick an M that divides it.",
            )

    def units(self, shape: torch.Size, kind: str) -> int:
        rows, cols = matrix_shape(shape, kind)
        return rows * cols

    def unit_scores(self, scores: torch.Tensor, kind: str) -> torch.Tensor:
        return to_matrix(scores, kind).reshape(-1)

    def mask(self, scores: torch.Tensor, kind: str, n_prune: int | None = None) -> torch.Tensor:
        """Keep the N best of each group of M; n_prune is implied and checked."""
        rows, cols = matrix_shape(scores.shape, kind)
        expected = rows * cols * (self.m - self.n) // self.m
        if n_prune is not None and n_prune != expected:
            raise PruneError(f"N:M pattern {self.name} prunes exactly {expected} weights here, not {n_prune}")
        groups = to_matrix(scores, kind).reshape(rows, cols // self.m, self.m)
        # Stable ordering: among equal scores the earlier input wins, so results do not depend on threads.
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., : self.n], True)
        return from_matrix(keep.reshape(rows, cols), kind, scores.shape)


Pattern = Unstructured | Blocks | NM

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*(?:block:)?\s*(\d+)\s*x\s*(\d+)\s*$")
ALLOWED = "'unstructured', an N:M ratio such as '2:4' (0 < N < M), or a block shape such as '4x1' (outputs x inputs)"


def parse_pattern(pattern: "str | Pattern") -> Pattern:
    """Parse 'unstructured', 'N:M' or 'RxC' into a pattern object."""
    if isinstance(pattern, (Unstructured, Blocks, NM)):
        return pattern
    if not isinstance(pattern, str):
        raise ArgumentError("pattern", pattern, ALLOWED)
    if pattern.strip().lower() in ("unstructured", "element", "1x1"):
        return Unstructured()
    match = _NM.match(pattern)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ArgumentError("pattern", pattern, "N:M with 0 < N < M, such as '2:4' or '4:8'")
        return NM(n, m)
    match = _BLOCK.match(pattern.lower())
    if match:
        r, c = int(match.group(1)), int(match.group(2))
        if r < 1 or c < 1:
            raise ArgumentError("pattern", pattern, "a block shape with positive sides, such as '4x1'")
        return Unstructured() if r == c == 1 else Blocks(r, c)
    close = difflib.get_close_matches(pattern.strip().lower(), ("unstructured", "element", "2:4", "4:8", "4x1"), n=1)
    raise ArgumentError("pattern", pattern, ALLOWED, f"Did you mean {close[0]!r}?" if close else "")
