"""Magnitude pruning: the |W| reference, thresholded over each whole layer (or N:M)."""
from __future__ import annotations

import torch

from .masks import layer_mask, nm_mask


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask dropping the smallest |W| of the layer (or N smallest in every M inputs)."""
    s = weight.abs().to(torch.float32)
    return nm_mask(s, *nm) if nm else layer_mask(s, sparsity)
