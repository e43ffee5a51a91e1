"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): one-shot pruning with OBS updates.

Columns are processed left to right. Pruning weight (r, j) leaves an error that the Optimal
Brain Surgeon update spreads over the not-yet-processed columns of row r through the inverse
Hessian of the layer inputs, so the layer output `W X` changes as little as possible. The
inverse is taken once, as the upper Cholesky factor of `H^-1` (its row j is the update
direction after columns < j are fixed). Updates inside a block of `blocksize` columns are
applied column by column; the block's accumulated error reaches the columns to its right
in one matrix product ("lazy batch updates"). The mask is chosen per block from
w^2 / [H^-1]_jj^2 (unstructured: over the whole block; N:M: per group of M columns).
"""
from __future__ import annotations

import torch

from ..errors import ShearkitError
from .masks import check_nm_shape


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the mask of dead inputs.

    Inputs that never fired (H_jj = 0) get H_jj = 1 so H stays invertible; their weights are
    irrelevant to the output and are pruned first. `damp` adds damp * mean(diag H) to the
    diagonal (1% as in the paper) for numerical stability.
    """
    h = hessian.to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    try:
        chol = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:  # pragma: no cover - only for badly conditioned inputs
        raise ShearkitError("The calibration Hessian is not positive definite even after dampening; "
                            "raise the SparseGPT 'damp' option or use more calibration samples.") from None
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True), dead


def _block_counts(rows: int, cols: int, sparsity: float, blocksize: int) -> list[int]:
    """Weights to prune in each column block, summing exactly to round(sparsity * rows * cols)."""
    bounds = list(range(0, cols, blocksize)) + [cols]
    return [round(sparsity * rows * b) - round(sparsity * rows * a) for a, b in zip(bounds, bounds[1:])]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an (out, in) weight with SparseGPT; returns (updated weight, keep-mask).

    Args:
        weight: (out, in) weight; not modified.
        hessian: (in, in) Hessian of the layer inputs (2/N X^T X).
        sparsity: fraction zeroed, exactly round(sparsity * numel) weights (ignored with nm).
        nm: (N, M) to zero N weights in every M consecutive inputs instead.
        blocksize: columns per lazy-update block (a multiple of M under N:M).
        damp: relative diagonal dampening of H.
    """
    rows, cols = weight.shape
    if nm:
        check_nm_shape(cols, nm[1])
        if blocksize % nm[1]:
            raise ShearkitError(f"SparseGPT blocksize {blocksize} must be a multiple of M={nm[1]} (the N:M group "
                                f"size); set prune.blocksize to a multiple of {nm[1]}.")
    w = weight.to(torch.float32).clone(memory_format=torch.contiguous_format)
    u, dead = inverse_hessian_factor(hessian.to(w.device), damp)
    w[:, dead] = 0.0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    counts = _block_counts(rows, cols, sparsity, blocksize)
    for bi, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone(memory_format=torch.contiguous_format)
        u1 = u[i1:i2, i1:i2]
        d = torch.diag(u1)
        err1 = torch.zeros_like(w1)
        k1 = torch.ones_like(w1, dtype=torch.bool)
        if not nm:
            score = w1.pow(2) / d.pow(2).view(1, -1)
            drop = score.reshape(-1).argsort(stable=True)[:counts[bi]]
            k1.view(-1)[drop] = False
        for j in range(i2 - i1):
            if nm and j % nm[1] == 0:
                score = w1[:, j:j + nm[1]].pow(2) / d[j:j + nm[1]].pow(2).view(1, -1)
                drop = score.topk(nm[0], dim=1, largest=False).indices
                k1[:, j:j + nm[1]].scatter_(1, drop, False)
            col = w1[:, j]
            q = torch.where(k1[:, j], col, torch.zeros_like(col))
            e = (col - q) / d[j]
            # OBS: compensate the error on the remaining columns of this block
            w1[:, j:] -= e.view(-1, 1) * u1[j, j:].view(1, -1)
            w1[:, j] = q
            err1[:, j] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = k1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy batch update of the columns to the right
    w[~keep] = 0.0
    return w.to(weight.dtype), keep
