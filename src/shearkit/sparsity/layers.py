"""The weight matrices of a block that unstructured sparsity applies to, seen as (out, in).

Sparsity is decided per weight-holding module: GPT-2's fused `c_attn` is one matrix (its q, k
and v rows share inputs), and `Conv1D` weights are stored (in, out), so every function here
reads and writes the (out, in) orientation and the masks are kept in that orientation too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch.base import BlockView


@dataclass
class LinearRef:
    """One weight matrix of a block: full module name, name inside the block, module, layout."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    rel: str  # e.g. "self_attn.q_proj" (the key used in plans)
    module: nn.Module
    transposed: bool  # Conv1D: stored (in, out)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as an (out, in) view."""
        w = self.module.weight
        return w.T if self.transposed else w

    @torch.no_grad()
    def set_weight(self, w_oi: torch.Tensor) -> None:
        """Write an (out, in) tensor into the module's weight (in its own dtype and layout)."""
        self.weight.copy_(w_oi.to(self.module.weight.dtype))

    @torch.no_grad()
    def apply_mask(self, keep_oi: torch.Tensor) -> None:
        """Zero the weights whose (out, in) keep-mask entry is False."""
        self.weight.mul_(keep_oi.to(device=self.module.weight.device, dtype=self.module.weight.dtype))


def block_linears(view: BlockView) -> dict[str, LinearRef]:
    """The distinct weight matrices of a block, attention first, by name inside the block."""
    out: dict[str, LinearRef] = {}
    for p in view.projections():
        rel = p.name[len(view.name) + 1:]
        if rel not in out:
            out[rel] = LinearRef(p.name, rel, p.module, p.transposed)
    return out


def linear_param_count(view: BlockView) -> int:
    """Weights (not biases) of the block's linear layers: the denominator of its sparsity."""
    return sum(r.module.weight.numel() for r in block_linears(view).values())
