"""SparseGPT (Frantar & Alistarh 2023): prune a linear layer and update the survivors to keep its outputs.

With H = 2 X X^T / n (the layer-wise least-squares Hessian), columns are processed in blocks; within a block the
mask is chosen by w^2 / [H^-1]_jj^2 (the OBS saliency) and every removed weight's error is spread over the columns
still to come through the upper Cholesky factor of H^-1. Written from the paper's Algorithm 1.
"""

from __future__ import annotations

import torch

from ..errors import ModelError


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp*I)^-1, and the mask of dead inputs (never active in calibration).
    copy=False lets a float64 `hessian` the caller no longer needs be damped in place (one n x n matrix less)."""
    h = hessian.double()  # float64: the factorisation of a 576x576..4096x4096 H is ill-conditioned in fp32
    if copy and h.data_ptr() == hessian.data_ptr():
        h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    damp = dampening * torch.mean(torch.diagonal(h))
    h.diagonal().add_(damp)
    try:
        factor = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as exc:
        raise ModelError(f"the calibration Hessian is not positive definite even after dampening ({exc}); "
                         "raise dampening or use more calibration data") from None
    del h  # each n x n float64 intermediate is freed as soon as the next exists: at most two at a time
    inverse = torch.cholesky_inverse(factor)
    del factor
    upper = torch.linalg.cholesky(inverse, upper=True)
    del inverse
    return upper.float(), dead


def _block_prune_counts(rows: int, cols: int, blocksize: int, sparsity: float) -> list[int]:
    """Elements to prune in each column block so the layer total is exactly round(sparsity * rows * cols)."""
    counts, done = [], 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        target = round(sparsity * rows * end)
        counts.append(target - done)
        done = target
    return counts


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (outputs x inputs) weight with SparseGPT; returns (updated weight, keep-mask).

    `factor`: `inverse_hessian_factor(hessian, dampening)` when already computed (layers sharing an input, such as
    q/k/v, share it); `hessian` is then not read.

    Unstructured: exactly round(sparsity * numel) weights are removed. N:M (n kept of every m inputs): m must divide
    blocksize so groups never straddle a block.
    """
    # Work on the transpose (inputs x outputs): each input column becomes a contiguous row, so the per-column
    # OBS updates below touch contiguous memory (several times faster than strided column slices).
    wt = weight.detach().t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    cols, rows = wt.shape
    hinv, dead = factor if factor is not None else inverse_hessian_factor(hessian, dampening)
    hinv, dead = hinv.to(wt.device), dead.to(wt.device)
    wt[dead] = 0
    pruned = torch.zeros(cols, rows, dtype=torch.bool, device=wt.device)
    counts = _block_prune_counts(rows, cols, blocksize, sparsity) if n is None else None

    for b, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w1 = wt[start:end]  # a view: updated in place
        hinv1 = hinv[start:end, start:end]
        d = torch.diagonal(hinv1).clone()
        err1 = torch.zeros_like(w1)
        pruned1 = pruned[start:end]
        if n is None and counts[b]:
            saliency = (w1**2 / d.reshape(-1, 1) ** 2).reshape(-1)
            order = torch.sort(saliency, stable=True).indices[: counts[b]]
            pruned1.view(-1)[order] = True
        for i in range(end - start):
            if n is not None and i % m == 0:
                saliency = w1[i:i + m] ** 2 / d[i:i + m].reshape(-1, 1) ** 2
                drop = torch.sort(saliency, dim=0, stable=True).indices[: m - n]
                pruned1[i:i + m].scatter_(0, drop, True)
            row = w1[i]
            e = row.masked_fill(~pruned1[i], 0) / d[i]
            # OBS update: compensate the removed weights with the inputs not yet processed.
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
            row.masked_fill_(pruned1[i], 0)
            err1[i] = e
        wt[end:].addmm_(hinv[start:end, end:].t(), err1, alpha=-1)
    wt.masked_fill_(pruned, 0)
    return wt.t().to(weight.dtype), ~pruned.t()
