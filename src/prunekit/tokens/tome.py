"""Token Merging (ToMe): bipartite soft matching on key similarity, size-weighted merges, proportional attention.

Bolya et al. 2023, Token Merging: Your ViT But Faster (ICLR). Tokens alternate into sets A and B; each A token is
linked to its most similar B token (cosine of the attention keys, averaged over heads); the r most similar links
are merged by a size-weighted average; attention then adds log(size) to its logits so that a merged token counts
as the tokens it stands for. The first (class) token is never merged.
"""

from __future__ import annotations

import torch

from ..errors import ArgumentError
from .merge import Reduction, identity, survivors_map

# Link scores that order padding (size 0) before and after every real similarity, which lies in [-1, 1].
PAD_PAIR, MIXED_PAIR = float("inf"), -2.0


def max_merges(tokens: int, protect_first: bool = True) -> int:
    """The largest r one bipartite matching allows: every A token but a protected first one."""
    return max((tokens + 1) // 2 - int(protect_first), 0)


def check_merges(r: int, tokens: int, protect_first: bool = True, where: str = "") -> int:
    """Validate r for `tokens` tokens; the error names the maximum."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ArgumentError("r", r, "a whole number >= 0 of tokens to merge per layer")
    limit = max_merges(tokens, protect_first)
    if r > limit:
        place = f" {where}" if where else ""
        raise ArgumentError(
            "r", r, f"at most {limit} merges{place}: bipartite matching of {tokens} tokens pairs "
            f"{(tokens + 1) // 2} A tokens" + (" and never merges the first (class) token" if protect_first else ""))
    return r


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool = True,
                            size: torch.Tensor | None = None) -> Reduction:
    """The ToMe reduction of (batch, tokens, dim) `metric`: merge the r most similar A -> B links per sequence.

    `size` (batch, tokens, 1) marks padding with 0: padding links to padding first and real tokens never merge into
    padding unless a row has nothing else left (where padding, of size 0, then does not change the average).
    Surviving tokens keep their original order, so the first token stays first.
    """
    batch, tokens, _ = metric.shape
    check_merges(r, tokens, protect_first)
    if r == 0:
        return identity(batch, tokens, metric.device)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (batch, |A|, |B|) cosine similarities
    if size is not None:
        valid = size[..., 0] > 0
        va, vb = valid[:, ::2, None], valid[:, None, 1::2]
        scores = torch.where(va & vb, scores, torch.where(~va & ~vb, PAD_PAIR, MIXED_PAIR))
    if protect_first:
        scores[:, 0, :] = -float("inf")
    best, partner = scores.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]  # A positions merged away
    dst = partner.gather(1, src)  # their B partners
    src_tokens, dst_tokens = 2 * src, 2 * dst + 1
    keep = torch.ones(batch, tokens, dtype=torch.bool, device=metric.device)
    keep.scatter_(1, src_tokens, False)
    where = survivors_map(keep)
    where.scatter_(1, src_tokens, where.gather(1, dst_tokens))
    return Reduction(where, tokens - r)
