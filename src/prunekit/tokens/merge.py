"""A token reduction as one index map, and its size-weighted application (shared by merging and pruning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reduction:
    """Where each of N tokens goes: `where[b, i]` is its new index in [0, n_out), or -1 when it is dropped."""

    where: torch.Tensor  # (batch, tokens) long
    n_out: int

    @property
    def removed(self) -> int:
        """How many tokens the reduction removes."""
        return self.where.shape[1] - self.n_out


def identity(batch: int, tokens: int, device: torch.device | None = None) -> Reduction:
    """The reduction that keeps every token where it is."""
    where = torch.arange(tokens, device=device).expand(batch, tokens).clone()
    return Reduction(where, tokens)


def survivors_map(keep: torch.Tensor) -> torch.Tensor:
    """New index of each kept token (in the original order) and -1 for the others; `keep` is (batch, tokens) bool."""
    rank = keep.long().cumsum(dim=1) - 1
    return torch.where(keep, rank, torch.full_like(rank, -1))


def apply_reduction(x: torch.Tensor, size: torch.Tensor, reduction: Reduction) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens sent to each new index: returns (x, size) with n_out tokens.

    Tokens of size 0 (padding) carry no weight; a new token that received only padding becomes zeros of size 0.
    A token moved alone keeps its value exactly (x * 1 / 1).
    """
    batch, _, channels = x.shape
    n_out = reduction.n_out
    # Dropped tokens go to a spare slot n_out that is sliced off afterwards.
    index = torch.where(reduction.where >= 0, reduction.where, torch.full_like(reduction.where, n_out))
    total = x.new_zeros(batch, n_out + 1, channels)
    total.scatter_add_(1, index[..., None].expand(-1, -1, channels), x * size)
    new_size = size.new_zeros(batch, n_out + 1, 1)
    new_size.scatter_add_(1, index[..., None], size)
    total, new_size = total[:, :n_out], new_size[:, :n_out]
    averaged = torch.where(new_size > 0, total / new_size.clamp_min(torch.finfo(size.dtype).tiny), 0.0)
    return averaged.to(x.dtype), new_size


def compose_source(source: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Map each original token to its token after `reduction` (-1 once it has been dropped)."""
    gathered = reduction.where.gather(1, source.clamp_min(0))
    return torch.where(source >= 0, gathered, source)
