"""Importance scores: plain functions from a GroupSet (and statistics) to one score per group.

Every score is built the same way (LLM-Pruner's scheme): an element-wise value over each tensor
slice of a group (weight rows/columns, and the bias with output rows), reduced to one number per
slice, then the slices of a group combined by an aggregation (`sum`, `mean`, `max`, `prod`).
LoRA factors never contribute (they are not base parameters).

- `magnitude(p=1|2)`: sum of |w|^p over the slice.
- `taylor(variant="element")`: sum of |w * dL/dw| over the slice (first-order Taylor of the loss
  change when each weight is zeroed, LLM-Pruner's element-wise importance).
- `taylor(variant="vector")`: |sum of w * dL/dw| over the slice (the first-order change when
  the whole slice is zeroed at once, LLM-Pruner's vector-wise importance).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import ShearkitError
from ..arch.modules import unwrap, weight_view
from ..graph.groups import GroupSet, Part
from .stats import Stats

AGGREGATIONS = ("sum", "mean", "max", "prod")
TAYLOR_VARIANTS = ("element", "vector")

Elem = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _weight_of(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach().float().cpu()
    if w.dim() == 1:
        return w
    if isinstance(mod, nn.Embedding):
        return w.T
    return weight_view(mod).detach().float().cpu()


def _part_score(model: nn.Module, part: Part, elem: Elem, stats: Stats | None, post_abs: bool) -> torch.Tensor:
    """One value per group for this part: elem(w, g) summed over the group's indices."""
    mod = model.get_submodule(part.module)
    w = _weight_of(mod)
    g = stats.grads.get(part.module) if stats is not None else None
    e = elem(w, g)
    idx = part.index
    if part.dim == 0:
        val = e[idx].reshape(idx.shape[0], -1).sum(1)
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor):
            gb = stats.bias_grads.get(part.module) if stats is not None else None
            val = val + elem(b.detach().float().cpu(), gb)[idx].sum(1)
    else:
        val = e[:, idx].sum(dim=(0, 2))
    return val.abs() if post_abs else val


def aggregate(values: list[torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Combine per-slice scores (each (n_groups,)) into one score per group."""
    if how not in AGGREGATIONS:
        raise ShearkitError(f"Unknown aggregation '{how}'; choose one of {', '.join(AGGREGATIONS)}.")
    if not values:
        raise ShearkitError("A group set with no base tensors cannot be scored: give it a part on a base weight "
                            "(not only LoRA factors), or use a set from shearkit.graph (mlp_channels, kv_groups, ...).")
    st = torch.stack(values)
    if how == "sum":
        return st.sum(0)
    if how == "mean":
        return st.mean(0)
    if how == "max":
        return st.max(0).values
    return st.prod(0)


def score_groups(model: nn.Module, gs: GroupSet, elem: Elem, stats: Stats | None = None, *,
                 aggregation: str = "sum", post_abs: bool = False) -> torch.Tensor:
    """Score every group of `gs` with element function `elem(weight, grad)` and `aggregation`."""
    m = unwrap(model)
    return aggregate([_part_score(m, p, elem, stats, post_abs) for p in gs.base_parts()], aggregation)


def magnitude(model: nn.Module, gs: GroupSet, *, p: int = 2, aggregation: str = "sum") -> torch.Tensor:
    """L1 (`p=1`) or L2 (`p=2`, squared norm) weight magnitude of each group."""
    if p not in (1, 2):
        raise ShearkitError(f"Magnitude norm must be 1 or 2, got {p}.")
    return score_groups(model, gs, lambda w, g: w.abs().pow(p), aggregation=aggregation)


def taylor(model: nn.Module, gs: GroupSet, stats: Stats, *, variant: str = "element",
           aggregation: str = "sum") -> torch.Tensor:
    """First-order Taylor importance |ΔL| of each group from accumulated gradients (LLM-Pruner)."""
    if variant not in TAYLOR_VARIANTS:
        raise ShearkitError(f"Unknown Taylor variant '{variant}'; choose one of {', '.join(TAYLOR_VARIANTS)}.")
    if not stats.grads:
        raise ShearkitError("Taylor importance needs gradients: collect statistics with grads=True.")

    def elem(w, g):
        if g is None:
            raise ShearkitError("A group touches a tensor without a recorded gradient: collect_stats records the "
                                "gradients of the decoder blocks' linear layers only, so score groups inside the "
                                "blocks (not hidden channels).")
        wg = w * g
        return wg.abs() if variant == "element" else wg

    return score_groups(model, gs, elem, stats, aggregation=aggregation, post_abs=variant == "vector")


def wanda(model: nn.Module, gs: GroupSet, stats: Stats, *, aggregation: str = "sum") -> torch.Tensor:
    """|w| * ||x_in|| summed over each group's weight entries (input-activation-weighted magnitude)."""
    if not stats.act_sq:
        raise ShearkitError("Wanda importance needs activation norms: collect statistics with act_norms=True.")

    def part(p: Part) -> torch.Tensor:
        m = unwrap(model)
        mod = m.get_submodule(p.module)
        w = _weight_of(mod)
        if w.dim() != 2 or p.module not in stats.act_sq:
            raise ShearkitError(f"No activation statistics for {p.module}: collect_stats records the inputs of the "
                                "decoder blocks' linear layers only, so score groups inside the blocks (not hidden "
                                "channels).")
        e = w.abs() * stats.act_sq[p.module].sqrt()[None, :]
        return e[p.index].reshape(p.index.shape[0], -1).sum(1) if p.dim == 0 else e[:, p.index].sum(dim=(0, 2))

    return aggregate([part(p) for p in gs.base_parts()], aggregation)
