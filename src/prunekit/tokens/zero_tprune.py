"""Zero-TPrune: zero-shot token pruning from the attention graph, by importance then by similarity.

Wang, Dedhia & Jha 2024, Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers (CVPR). I-stage: each head's attention matrix is a graph; Weighted PageRank
s <- A^T s (from the uniform distribution) gives every token an importance; heads are combined by the root of the sum
of squares (Emphasizing Informative Region), optionally only over heads whose score variance lies in a range
(Variance-based Head Filter); the least important tokens are pruned. S-stage: the remaining tokens, ranked by
importance, alternate into groups B (the more important of each pair) and A; each A token's similarity to its
closest B token (cosine of keys) is computed and the most redundant A tokens are pruned.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import ArgumentError
from .merge import Reduction, identity, survivors_map


def paper_iterations(layer: int, depth: int) -> int:
    """WPR iterations by depth as in the paper: 30 in the first three layers, 5 in the middle, 1 in the last three."""
    if layer < 3:
        return 30
    return 1 if layer >= depth - 3 else 5


def weighted_pagerank(attention: torch.Tensor, iterations: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head importance (batch, heads, tokens) by s <- A^T s from uniform s over the valid tokens.

    `attention` is (batch, heads, tokens, tokens) with rows that sum to 1 (query i attends to key j with A[i, j]);
    rows of padding queries are ignored, so the scores of each head sum to 1 over the valid tokens.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ArgumentError("iterations", iterations, "a whole number >= 1 of PageRank steps")
    batch, heads, tokens, _ = attention.shape
    if valid is None:
        valid = torch.ones(batch, tokens, dtype=torch.bool, device=attention.device)
    weight = valid.to(attention.dtype)
    graph = attention * weight[:, None, :, None]  # padding queries cast no votes
    scores = (weight / weight.sum(dim=1, keepdim=True))[:, None, :].expand(batch, heads, tokens)
    for _ in range(iterations):
        scores = (scores[..., None, :] @ graph)[..., 0, :]  # s_j <- sum_i s_i A[i, j]
    return scores


def aggregate_heads(scores: torch.Tensor, head_filter: tuple[float, float] | None = None) -> torch.Tensor:
    """Emphasizing Informative Region: sqrt(sum over heads of s^2), (batch, heads, tokens) -> (batch, tokens).

    With `head_filter=(low, high)` only heads whose variance of N * s (scores rescaled to mean 1) lies in the range
    take part; a sequence where no head qualifies falls back to all heads.
    """
    squares = scores ** 2
    if head_filter is not None:
        low, high = head_filter
        variance = (scores * scores.shape[-1]).var(dim=-1)  # (batch, heads)
        chosen = (variance >= low) & (variance <= high)
        chosen = torch.where(chosen.any(dim=1, keepdim=True), chosen, torch.ones_like(chosen))
        squares = squares * chosen[..., None]
    return squares.sum(dim=1).sqrt()


def split_r(r: int, importance_share: float) -> tuple[int, int]:
    """(pruned by importance, pruned by similarity) for r tokens."""
    by_importance = int(math.floor(r * importance_share + 0.5))
    return by_importance, r - by_importance


def max_prunes(tokens: int, importance_share: float = 0.5, protect_first: bool = True) -> int:
    """The largest r one layer allows: the similarity stage can only prune from its group A."""
    best = 0
    for r in range(tokens + 1):
        by_importance, by_similarity = split_r(r, importance_share)
        remaining = tokens - by_importance
        if by_importance <= tokens - int(protect_first) and by_similarity <= remaining // 2:
            best = r
    return best


def check_prunes(r: int, tokens: int, importance_share: float = 0.5, protect_first: bool = True,
                 where: str = "") -> int:
    """Validate r for `tokens` tokens; the error names the maximum."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ArgumentError("r", r, "a whole number >= 0 of tokens to prune per layer")
    limit = max_prunes(tokens, importance_share, protect_first)
    if r > limit:
        place = f" {where}" if where else ""
        raise ArgumentError("r", r, f"at most {limit} pruned tokens{place} for {tokens} tokens "
                                    f"(importance_share={importance_share})")
    return r


def check_share(importance_share: float) -> float:
    """Validate the share of r pruned by importance: a number in [0, 1]."""
    try:
        share = float(importance_share)
    except (TypeError, ValueError):
        raise ArgumentError("importance_share", importance_share, "a number in [0, 1]") from None
    if not 0.0 <= share <= 1.0:
        raise ArgumentError("importance_share", importance_share, "a number in [0, 1]")
    return share


def zero_tprune_select(attention: torch.Tensor, metric: torch.Tensor, r: int, importance_share: float = 0.5,
                       iterations: int = 30, protect_first: bool = True, size: torch.Tensor | None = None,
                       head_filter: tuple[float, float] | None = None) -> Reduction:
    """The Zero-TPrune reduction: drop r tokens, a share by importance (WPR), the rest by similarity to kept ones.

    Padding (size 0) counts as least important and most redundant, so it goes first.
    """
    batch, tokens, _ = metric.shape
    share = check_share(importance_share)
    check_prunes(r, tokens, share, protect_first)
    if r == 0:
        return identity(batch, tokens, metric.device)
    valid = size[..., 0] > 0 if size is not None else torch.ones(batch, tokens, dtype=torch.bool,
                                                                  device=metric.device)
    importance = aggregate_heads(weighted_pagerank(attention, iterations, valid), head_filter)
    importance = torch.where(valid, importance, -float("inf"))
    if protect_first:
        importance[:, 0] = float("inf")
    by_importance, by_similarity = split_r(r, share)
    ranked = torch.sort(importance, dim=1, descending=True, stable=True).indices
    keep = torch.ones(batch, tokens, dtype=torch.bool, device=metric.device)
    if by_importance:
        keep.scatter_(1, ranked[:, tokens - by_importance:], False)
    if by_similarity:
        remaining = ranked[:, :tokens - by_importance]
        group_b, group_a = remaining[:, 0::2], remaining[:, 1::2]
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        pick = lambda index: unit.gather(1, index[..., None].expand(-1, -1, unit.shape[-1]))  # noqa: E731
        similarity = pick(group_a) @ pick(group_b).transpose(-1, -2)
        va, vb = valid.gather(1, group_a)[..., None], valid.gather(1, group_b)[:, None, :]
        similarity = torch.where(va & vb, similarity, torch.where(~va, float("inf"), -2.0))
        redundancy = similarity.max(dim=-1).values
        order = torch.sort(redundancy, dim=1, descending=True, stable=True).indices[:, :by_similarity]
        keep.scatter_(1, group_a.gather(1, order), False)
    return Reduction(survivors_map(keep), tokens - r)


def layer_iterations(iterations: int | Sequence[int] | None, depth: int) -> list[int]:
    """WPR iterations for each of `depth` layers: the paper's schedule, one number, or one per layer."""
    if iterations is None:
        return [paper_iterations(i, depth) for i in range(depth)]
    if isinstance(iterations, int) and not isinstance(iterations, bool):
        return [iterations] * depth
    values = list(iterations)
    if len(values) != depth:
        raise ArgumentError("iterations", iterations, f"one number or {depth} numbers (one per layer)")
    return values
