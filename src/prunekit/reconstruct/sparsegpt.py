"""SparseGPT (Frantar & Alistarh 2023): prune a linear layer and update the survivors to keep its outputs.

With H = 2 X X^T / n (the layer-wise least-squares Hessian), columns are processed in blocks; within a block the
mask is chosen by w^2 / [H^-1]_jj^2 (the OBS saliency) and every removed weight's error is spread over the columns
still to come through the upper Cholesky factor of H^-1. Written from the paper's Algorithm 1.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from ..threads import intra_op_threads


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
        factor = torch.linalg.cholesky(h.flip(0, 1))
    except torch.linalg.LinAlgError as exc:
        raise ModelError(f"the calibration Hessian is not positive definite even after dampening ({exc}); "
                         "raise dampening or use more calibration data") from None
    del h  # each n x n float64 intermediate is freed as soon as the next exists: at most two at a time
    # With J the reversal permutation and J H J = L L^T, H = (J L J)(J L J)^T with J L J upper triangular, so
    # H^-1 = U^T U for U = (J L J)^-1 = J L^-1 J: upper with a positive diagonal, i.e. the upper Cholesky factor of
    # H^-1. One factorisation and one triangular inverse, instead of factor, invert, factor again.
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    upper = torch.linalg.solve_triangular(factor, eye, upper=False).flip(0, 1)
    del factor, eye
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
    if factor is None:
        factor = inverse_hessian_factor(hessian, dampening)
    return sparsegpt_prune_group([weight], factor, sparsity, n, m, blocksize)[0]


@torch.no_grad()
def sparsegpt_prune_group(
    weights: list[torch.Tensor],
    factor: tuple[torch.Tensor, torch.Tensor],
    sparsity: float = 0.5,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = 128,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SparseGPT on layers fed one input (q/k/v, gate/up: one inverse Hessian factor), in one column sweep.

    Output rows are independent given H^-1, so the layers' rows are stacked and swept together (one Python loop over
    the columns instead of one per layer); each layer's unstructured mask is still chosen within its own rows, with
    exactly round(sparsity * numel) weights removed per layer. Returns (updated weight, keep-mask) per layer.
    """
    # Work on the transpose (inputs x outputs): each input column becomes a contiguous row, so the per-column
    # OBS updates below touch contiguous memory (several times faster than strided column slices).
    wt = torch.cat([w.detach().t().to(torch.float32) for w in weights], dim=1)
    cols, rows = wt.shape
    widths = [int(w.shape[0]) for w in weights]
    offsets = [sum(widths[:k]) for k in range(len(widths) + 1)]
    hinv, dead = factor
    hinv, dead = hinv.to(wt.device), dead.to(wt.device)
    wt[dead] = 0
    pruned = torch.zeros(cols, rows, dtype=torch.bool, device=wt.device)
    counts = [_block_prune_counts(width, cols, blocksize, sparsity) for width in widths] if n is None else None
    err1 = torch.empty(min(blocksize, cols), rows, dtype=wt.dtype, device=wt.device)

    for b, start in enumerate(range(0, cols, blocksize)):
        end = min(start + blocksize, cols)
        w1 = wt[start:end]  # a view: updated in place
        hinv1 = hinv[start:end, start:end]
        d = torch.diagonal(hinv1).reshape(-1, 1)
        pruned1 = pruned[start:end]
        err = err1[: end - start]
        # The block's own work is many small steps, on one thread (see _sweep_block); the large update of the
        # columns after it keeps the caller's threads.
        with intra_op_threads(1):
            scale = None
            if n is None:
                saliency = w1**2 / d**2
                for k, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:])):
                    if counts[k][b]:
                        order = torch.sort(saliency[:, lo:hi].reshape(-1), stable=True).indices[: counts[k][b]]
                        pruned1[order // (hi - lo), order % (hi - lo) + lo] = True  # a column slice has no flat view
                # e_i = w_i * pruned_i / d_i for every column of the block, the mask being fixed for the whole block.
                scale = pruned1.to(wt.dtype) / d
            _sweep_block(w1, hinv1, d, pruned1, err, scale, n, m)
        wt[end:].addmm_(hinv[start:end, end:].t(), err, alpha=-1)
    wt.masked_fill_(pruned, 0)
    return [(wt[:, lo:hi].t().to(w.dtype), ~pruned[:, lo:hi].t())
            for w, lo, hi in zip(weights, offsets[:-1], offsets[1:])]


def _sweep_block(w1: torch.Tensor, hinv1: torch.Tensor, d: torch.Tensor, pruned1: torch.Tensor, err: torch.Tensor,
                 scale: torch.Tensor | None, n: int | None, m: int | None) -> None:
    """The column-by-column OBS updates inside one block (in place on w1 and err; N:M masks chosen on the way).

    Run on one thread: each step is a small rank-1 update, for which fork/join of a thread pool costs more than
    the arithmetic (on a busy machine, up to 8x more); the block's large update after it keeps the caller's threads.
    """
    for i in range(w1.shape[0]):
        if n is not None and i % m == 0:
            saliency = w1[i:i + m] ** 2 / d[i:i + m] ** 2
            drop = torch.sort(saliency, dim=0, stable=True).indices[: m - n]
            pruned1[i:i + m].scatter_(0, drop, True)
            scale_m = pruned1[i:i + m].to(w1.dtype) / d[i:i + m]
        e = torch.mul(w1[i], scale[i] if n is None else scale_m[i % m], out=err[i])
        # OBS update: compensate the removed weights with the inputs not yet processed. Row i itself is never
        # read again; its pruned entries are set to exactly 0 once, at the end.
        w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
