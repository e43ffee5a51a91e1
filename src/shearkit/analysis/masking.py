"""A reversible masking context: zero chosen group slices, then put every touched tensor back bit for bit.

Knowledge-distribution trials prune one node group at a time and must leave the model exactly as
they found it, also when a trial fails half-way. Each touched tensor (weight, and bias for output
rows) is copied before it is zeroed and copied back on leaving the context, whatever happens inside.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..arch.modules import unwrap
from ..graph.removal import Removal, removal_map
from ..plan import Plan
from ..surgery.slicing import zero


def node_removal(model: nn.Module, layer: int, entry: dict[str, list[int]]) -> Removal:
    """The slices (base weights and LoRA factors) one layer entry (`kv_groups`, `heads`,
    `mlp_channels`) names, as the surgery would remove them."""
    return removal_map(unwrap(model), Plan("analysis", "structured", 0.0, layers={str(layer): entry}))


@contextmanager
def zeroed(model: nn.Module, removal: Removal) -> Iterator[nn.Module]:
    """Zero every (module, dim) -> indices of `removal` inside the block; restore on exit."""
    m = unwrap(model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for (name, dim), idx in removal.items():
            if not idx:
                continue
            mod = m.get_submodule(name)
            saved.append((mod.weight, mod.weight.detach().clone()))
            bias = getattr(mod, "bias", None)
            if dim == 0 and isinstance(bias, torch.Tensor):
                saved.append((bias, bias.detach().clone()))
            zero(mod, dim, torch.tensor(sorted(idx), dtype=torch.long))
        yield model
    finally:
        with torch.no_grad():
            for tensor, copy in reversed(saved):  # reversed: a tensor saved twice gets its first copy last
                tensor.copy_(copy)
