"""Input statistics of linear layers, gathered with forward pre-hooks during calibration (see llm.gather_stats).

One accumulator per distinct input: per-input-column sums of squares (Wanda's ||X_j||^2), sums (means, for FLAP),
and on request the Hessian X X^T (SparseGPT). Inputs are flattened to (tokens, features), so it serves Linear and
transformers' Conv1D alike.
"""

from __future__ import annotations

import torch


XTX_TILE = 256


def add_upper_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper triangle (diagonal included) of x^T x to `total`; the lower triangle is left untouched.

    X^T X is symmetric, so one row tile at a time against the columns from the tile's first on: about half the
    multiply-adds and half the float64 traffic of the full product (the product is the largest cost of SparseGPT's
    statistics). Each product is float32 (fast) and the running total float64; the mixed-dtype add_ widens each
    value as it is read, without a float64 copy. The tiles depend only on the feature count, so a sample's products
    are the same on every rank and a split run adds up to the same total as one process.
    """
    features = x.shape[1]
    tile = -(-features // -(-features // XTX_TILE))  # equal tiles of at most XTX_TILE rows
    xt = x.t()
    for start in range(0, features, tile):
        total[start:start + tile, start:].add_(xt[start:start + tile] @ x[:, start:])


def symmetric_from_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `upper` holds (in place: the lower triangle is overwritten)."""
    lower = torch.tril_indices(upper.shape[0], upper.shape[1], -1, device=upper.device)
    upper[lower[0], lower[1]] = upper[lower[1], lower[0]]
    return upper


class InputStats:
    """Running statistics of one layer's inputs over all calibration tokens."""

    def __init__(self, features: int, hessian: bool = False) -> None:
        self.features = features
        self.tokens = 0
        self.sum = torch.zeros(features, dtype=torch.float64)
        self.sum_sq = torch.zeros(features, dtype=torch.float64)
        # float64: sums of per-sample products then agree to the last float32 bit whatever order they are added in,
        # so a run split across ranks (torch.distributed) reaches the same SparseGPT masks as one process. Only the
        # upper triangle is accumulated (add_upper_gram); readers see the full matrix (symmetric_from_upper).
        self.xtx = torch.zeros(features, features, dtype=torch.float64) if hessian else None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (any leading shape, last dimension = features)."""
        x = x.detach().reshape(-1, self.features).float()
        if self.sum.device != x.device:  # accumulate where the activations are (a GPU under --device cuda)
            self.to(x.device)
        self.tokens += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64)
        self.sum_sq += (x * x).sum(0, dtype=torch.float64)
        if self.xtx is not None:
            add_upper_gram(self.xtx, x)

    def inverse_factor(self, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT's (upper Cholesky factor of the damped inverse Hessian, dead inputs), computed once per
        dampening and shared by every layer fed this input (q/k/v, gate/up)."""
        from prunekit.reconstruct.sparsegpt import inverse_hessian_factor

        cache = self.__dict__.setdefault("_factors", {})
        if dampening not in cache:
            if self.xtx is None:
                raise RuntimeError("this accumulator's X X^T was released after an inverse factor was computed")
            # The factor is all the solver needs: X X^T becomes H in place and is then released (the largest
            # matrix of a block's statistics, n x n in float64).
            hessian, self.xtx = symmetric_from_upper(self.xtx).mul_(2.0 / max(self.tokens, 1)), None
            cache[dampening] = inverse_hessian_factor(hessian, dampening, copy=False)
        return cache[dampening]

    def to(self, device: torch.device | str) -> "InputStats":
        """Move the sums to `device` (statistics stay float64 wherever they live)."""
        self.sum, self.sum_sq = self.sum.to(device), self.sum_sq.to(device)
        if self.xtx is not None:
            self.xtx = self.xtx.to(device)
        return self

    @property
    def column_norm_sq(self) -> torch.Tensor:
        """||X_j||_2^2 per input column, over all tokens."""
        return self.sum_sq.float()

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input column."""
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each input column (FLAP's fluctuation)."""
        mean = self.sum / max(self.tokens, 1)
        return (self.sum_sq / max(self.tokens, 1) - mean * mean).clamp_min(0).float()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X X^T / n, the Hessian of the layer-wise squared error."""
        if self.xtx is None:
            raise RuntimeError("this accumulator has no X X^T (created without hessian=True, or released once "
                               "its inverse factor was computed)")
        return symmetric_from_upper(self.xtx.clone()) * (2.0 / max(self.tokens, 1))
