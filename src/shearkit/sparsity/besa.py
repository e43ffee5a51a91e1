"""BESA's differentiable sparsity allocation (Xu et al., ICLR 2024, arXiv 2402.16880).

Each allocation unit (a whole layer, or one output row) holds logits over D candidate sparsity
rates p_d (1.00, 0.99, ..., 0.00). With coefficients pi = softmax(theta):

- expected rate of the unit: alpha = sum_d pi_d p_d;
- hard mask (forward): weight (i, j) is kept iff its rank in its row (0 = least important)
  is >= floor(alpha * C_in);
- soft keep-probability (backward): P_ij = sum_d pi_d * [floor(p_d * C_in) <= rank_ij], the
  probability under the candidate mixture that a weight at that rank survives;
- straight-through: mask = M + P - sg(P).

Deviations from the released code, both for reaching high targets: plain softmax by default
(the code's softmax(sigmoid(theta)) keeps every unit's rate within about [0.376, 0.624], so
60-70% is unreachable), and logits initialised as a bump centred on the target rate (width
`init_width`; None gives the code's all-zero start, whose expected rate is 0.5 whatever the
target). After learning, `repair_counts` turns the rates into integer prune counts that hit the
block's budget exactly.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .masks import rank_in_row


def candidate_rates(step: float = 0.01) -> torch.Tensor:
    """Candidate sparsity rates 1, 1-step, ..., 0 (101 values for step 0.01)."""
    n = round(1.0 / step)
    return torch.tensor([1.0 - d * step for d in range(n + 1)], dtype=torch.float64).clamp_(0, 1).float()


class LayerAllocation(nn.Module):
    """Learnable sparsity of one (out, in) weight, per layer or per output row."""

    def __init__(self, scores: torch.Tensor, target: float, per_row: bool = True, step: float = 0.01,
                 init_width: float | None = 0.05, sigmoid_smooth: bool = False):
        super().__init__()
        rows, cols = scores.shape
        rates = candidate_rates(step).to(scores.device)
        self.cols = cols
        self.rows = rows
        self.per_row = per_row
        self.sigmoid_smooth = sigmoid_smooth
        self.register_buffer("rank", rank_in_row(scores), persistent=False)
        self.register_buffer("rates", rates, persistent=False)
        thresholds = torch.floor(rates * cols + 1e-6)
        # keep_table[d, r] = 1 when a weight of rank r survives candidate rate d
        self.register_buffer("keep_table", (thresholds.view(-1, 1) <= torch.arange(cols, device=scores.device)
                                            .view(1, -1)).float(), persistent=False)
        if init_width is None:
            init = torch.zeros_like(rates)
        else:
            init = -((rates - target) ** 2) / (2 * init_width ** 2)
        self.theta = nn.Parameter(init.repeat(rows if per_row else 1, 1))

    def coefficients(self) -> torch.Tensor:
        t = torch.sigmoid(self.theta) if self.sigmoid_smooth else self.theta
        return torch.softmax(t, dim=-1)

    def unit_rates(self) -> torch.Tensor:
        """Expected sparsity of each unit (rows, or one value for the layer)."""
        return self.coefficients() @ self.rates

    def row_rates(self) -> torch.Tensor:
        r = self.unit_rates()
        return r if self.per_row else r.expand(self.rows)

    def sparsity(self) -> torch.Tensor:
        """The layer's expected sparsity (differentiable)."""
        return self.unit_rates().mean()

    def mask(self) -> torch.Tensor:
        """Straight-through mask (rows, cols): hard 0/1 forward, soft gradient backward."""
        pi = self.coefficients()
        keep_by_rank = pi @ self.keep_table  # (units, cols)
        if self.per_row:
            soft = keep_by_rank.gather(1, self.rank)
        else:
            soft = keep_by_rank[0][self.rank]
        counts = torch.floor(self.row_rates().detach() * self.cols + 1e-6)
        hard = (self.rank >= counts.view(-1, 1)).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly `hard` forward; gradient of `soft`


def repair_counts(rates: list[torch.Tensor], cols: list[int], total: int) -> list[torch.Tensor]:
    """Integer prune counts per row that sum exactly to `total`, as close to `rates` as possible.

    Every row's rate is shifted by one common amount (found by bisection) so that the floor of
    rate*cols sums to at most `total`; the few weights still missing go to the rows closest to
    their next integer. This keeps the learned allocation's shape while hitting the block's
    budget exactly (BESA's penalty alone only gets near it).

    Args:
        rates: per layer, the (rows,) learned sparsity of each row.
        cols: per layer, the number of inputs (weights per row).
        total: weights to prune in the whole block.
    """
    r = torch.cat([x.detach().double().cpu() for x in rates])
    c = torch.cat([torch.full((x.numel(),), float(n), dtype=torch.float64) for x, n in zip(rates, cols)])
    if not 0 <= total <= c.sum():
        raise ValueError(f"total {total} outside [0, {int(c.sum())}]")

    def counts(shift: float) -> torch.Tensor:
        return torch.clamp(torch.floor((r + shift) * c + 1e-9), torch.zeros_like(c), c)

    lo, hi = -1.0, 1.0  # counts(lo) = 0 everywhere, counts(hi) = c everywhere
    for _ in range(100):
        mid = (lo + hi) / 2
        if counts(mid).sum() <= total:
            lo = mid
        else:
            hi = mid
    k = counts(lo)
    missing = int(total - k.sum())
    if missing:
        frac = (r + lo) * c - torch.floor((r + lo) * c + 1e-9)
        frac[k >= c] = -math.inf  # full rows cannot take more
        k[frac.argsort(descending=True, stable=True)[:missing]] += 1
    out, s = [], 0
    for x in rates:
        out.append(k[s:s + x.numel()].long())
        s += x.numel()
    return out
