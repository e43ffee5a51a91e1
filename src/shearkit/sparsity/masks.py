"""Keep-masks from importance scores: per row, per layer, and N:M. True = keep.

All functions take scores shaped like the (out, in) weight; lower scores are pruned first.
Counts are exact: a layer asked for sparsity s zeroes exactly round(s * numel) weights, and an
N:M mask zeroes exactly N weights in every group of M consecutive inputs of a row.
"""
from __future__ import annotations

import torch

from ..errors import ShearkitError

NM_CHOICES = ("2:4", "4:8")


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): N weights zeroed in every group of M consecutive inputs; None -> None."""
    if nm is None or nm == "":
        return None
    try:
        n, m = (int(v) for v in str(nm).split(":"))
    except ValueError:
        raise ShearkitError(f"--nm must look like N:M (e.g. 2:4 or 4:8), got '{nm}'.") from None
    if not 0 < n < m:
        raise ShearkitError(f"--nm {nm}: N must be between 1 and M-1.")
    return n, m


def check_nm_shape(cols: int, m: int, name: str = "layer") -> None:
    if cols % m:
        raise ShearkitError(f"{name} has {cols} inputs, not a multiple of M={m}; an N:M pattern needs whole groups.")


def rank_in_row(scores: torch.Tensor) -> torch.Tensor:
    """Position of each entry in its row's ascending order (0 = least important)."""
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return ranks.scatter_(1, order, ar)


# rows ranked at once: the sort's int64 temporaries stay near this many elements, not a layer's worth
# (a whole layer at once needs about five times its float32 size for a moment)
CHUNK_ELEMENTS = 1 << 18


def row_chunks(scores: torch.Tensor) -> list[tuple[int, int]]:
    """(lo, hi) row ranges of about `CHUNK_ELEMENTS` entries each: per-row work done a chunk at a time."""
    rows, cols = scores.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def mask_from_counts(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep-mask that zeroes the `counts[r]` lowest-scoring entries of each row r (rows ranked a chunk at
    a time: each row's ranks are its own, so the mask is the same)."""
    counts = counts.to(scores.device).view(-1, 1)
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for lo, hi in row_chunks(scores):
        keep[lo:hi] = rank_in_row(scores[lo:hi]) >= counts[lo:hi]
    return keep


def row_counts(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row prune counts summing to exactly round(sparsity * numel).

    Every row prunes floor(K / rows); the K mod rows leftover go to the rows whose next
    candidate has the lowest score, so the layer total is exact and Wanda's per-row
    comparison is kept.
    """
    rows, cols = scores.shape
    total = round(sparsity * rows * cols)
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.long, device=scores.device)
    if extra:
        nxt = torch.cat([scores[lo:hi].sort(dim=1).values[:, base] for lo, hi in row_chunks(scores)])
        counts[nxt.argsort(stable=True)[:extra]] += 1
    return counts


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of each output row (Wanda's comparison group)."""
    return mask_from_counts(scores, row_counts(scores, sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity * numel) lowest scores of the whole matrix."""
    k = round(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[scores.reshape(-1).argsort(stable=True)[:k]] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Zero the `n` lowest scores in every group of `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    check_nm_shape(cols, m)
    groups = scores.reshape(rows, cols // m, m)
    drop = groups.topk(n, dim=-1, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return keep.reshape(rows, cols)


def sparsity_of(keep: torch.Tensor) -> float:
    return 1.0 - keep.sum().item() / keep.numel()
