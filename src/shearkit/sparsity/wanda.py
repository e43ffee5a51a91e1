"""Wanda (Sun et al., 2023, arXiv 2306.11695): prune by |W_ij| * ||X_j||_2, compared per output row."""
from __future__ import annotations

import torch

from .masks import nm_mask, row_mask


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """|W| (out, in) times each input column's activation norm ||X_j||_2 (in,)."""
    return weight.abs().to(torch.float32) * col_norm.to(weight.device, torch.float32).view(1, -1)


def wanda_mask(weight: torch.Tensor, col_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask: per row, the lowest Wanda scores go (or N in every M inputs under N:M)."""
    s = wanda_scores(weight, col_norm)
    return nm_mask(s, *nm) if nm else row_mask(s, sparsity)
