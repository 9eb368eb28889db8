"""Input statistics of linear layers, gathered with forward pre-hooks during calibration (see llm.gather_stats).

One accumulator per distinct input: per-input-column sums of squares (Wanda's ||X_j||^2), sums (means, for FLAP),
and on request the Hessian X X^T (SparseGPT). Inputs are flattened to (tokens, features), so it serves Linear and
transformers' Conv1D alike.
"""

from __future__ import annotations

import torch


XTX_COLUMNS = 512


class InputStats:
    """Running statistics of one layer's inputs over all calibration tokens."""

    def __init__(self, features: int, hessian: bool = False) -> None:
        self.features = features
        self.tokens = 0
        self.sum = torch.zeros(features, dtype=torch.float64)
        self.sum_sq = torch.zeros(features, dtype=torch.float64)
        # float64: sums of per-sample products then agree to the last float32 bit whatever order they are added in,
        # so a run split across ranks (torch.distributed) reaches the same SparseGPT masks as one process
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
            # The product in float32 (fast), the running sum in float64; a slice of columns at a time, so the
            # temporary is features x 512 rather than a second features x features matrix. The mixed-dtype add_
            # widens each float32 value as it is read (exact, the same sum as .double() first) without writing a
            # float64 copy: one pass over the float64 total per sample instead of three.
            for start in range(0, self.features, XTX_COLUMNS):
                self.xtx[:, start:start + XTX_COLUMNS].add_(x.t() @ x[:, start:start + XTX_COLUMNS])

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
            hessian, self.xtx = self.xtx.mul_(2.0 / max(self.tokens, 1)), None
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
        return self.xtx * (2.0 / max(self.tokens, 1))
