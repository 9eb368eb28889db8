"""The PQ Index (Diao et al. 2023, Pruning Deep Neural Networks from a Sparsity Perspective, ICLR).

I(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q for 0 < p < q; it is 0 for a vector whose entries all have one
magnitude, 1 - d^(1/q - 1/p) for a one-hot vector (1 - 1/d at p = 0.5, q = 1), scale invariant, and grows as
the vector gets sparser (more compressible). Pure functions; SAP (prunekit.training.sap) prunes by them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ArgumentError


def check_pq(p: Any, q: Any) -> tuple[float, float]:
    """Validate the norm orders: real numbers with 0 < p < q."""
    for name, value in (("p", p), ("q", q)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ArgumentError(name, value, "a positive real number (the paper uses p=0.5, q=1)")
    if not p < q:
        raise ArgumentError("p", p, f"a number below q={q:g} (0 < p < q)")
    return float(p), float(q)


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0) -> float:
    """I(w) = 1 - d^(1/q - 1/p) ||w||_p / ||w||_q over all entries of `w` (float64); in [0, 1 - d^(1/q - 1/p)]."""
    p, q = check_pq(p, q)
    if not isinstance(w, torch.Tensor) or not (torch.is_floating_point(w) or w.dtype in (torch.int32, torch.int64)):
        raise ArgumentError("w", type(w).__name__, "a non-empty real tensor")
    flat = w.detach().reshape(-1).to(torch.float64).abs()
    d = flat.numel()
    if d == 0:
        raise ArgumentError("w", "an empty tensor", "a non-empty real tensor")
    if not bool(torch.isfinite(flat).all()):
        raise ArgumentError("w", "a tensor with nan or inf", "finite values")
    peak = float(flat.max())
    if peak == 0:
        raise ArgumentError("w", "an all-zero tensor", "a tensor with a non-zero entry (the index is 0/0 there)")
    flat = flat / peak  # scale invariance made exact, and no underflow in the p-th powers
    norm_p = float(flat.pow(p).sum()) ** (1.0 / p)
    norm_q = float(flat.pow(q).sum()) ** (1.0 / q)
    index = 1.0 - d ** (1.0 / q - 1.0 / p) * norm_p / norm_q
    return min(max(index, 0.0), 1.0)  # rounding can step a hair outside [0, 1)


def sap_keep_bound(index: float, d: int, p: float = 0.5, q: float = 1.0, eta: float = 0.0) -> int:
    """SAP's lower bound on the weights to retain: ceil(d (1 + eta)^(q/(p-q)) (1 - I)^(qp/(q-p)))."""
    p, q = check_pq(p, q)
    return math.ceil(d * (1.0 + eta) ** (q / (p - q)) * (1.0 - index) ** (q * p / (q - p)))


def sap_prune_count(index: float, d: int, p: float = 0.5, q: float = 1.0, eta: float = 0.0, gamma: float = 1.0,
                    beta: float = 0.9) -> int:
    """How many of the `d` remaining weights SAP prunes: floor(d * clip(gamma (1 - r/d), 0, beta))."""
    if d <= 0:
        return 0
    # d * gamma (1 - r/d) is computed as gamma (d - r): the same number without the rounding of r/d.
    wanted = max(gamma * (d - sap_keep_bound(index, d, p, q, eta)), 0.0)
    return min(math.floor(wanted), math.floor(d * beta))
