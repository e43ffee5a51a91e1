"""Wanda (Sun, Liu, Bair, Kolter, 2023; arXiv 2306.11695): prune by |W_ij| * ||X_j||_2.

```yaml
prune: {method: wanda, ratio: 0.5}          # or nm: "2:4" / "4:8"
calib: {dataset: c4, samples: 64, seqlen: 512}
```
Lifecycle: blockwise; for each block the input norm of every layer is gathered on the block's
(already pruned upstream) inputs, then each output row drops its lowest scores. No weight update.
Deviation: when sparsity * columns is not an integer, the leftover weights go to the rows whose
next candidate scores lowest, so each layer's sparsity is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..sparsity.wanda import wanda_mask
from . import register_method
from .blockwise import BlockwiseSparsifier, SparsityConfig


@dataclass
class WandaConfig(SparsityConfig):
    """Wanda has no options beyond the shared ones (ratio, nm, batch_size, device)."""


@register_method
class Wanda(BlockwiseSparsifier):
    """Wanda: |W|·||X|| per output row, unstructured or N:M, no retraining."""

    name = "wanda"
    config_cls = WandaConfig
    stats_kind = "norm"

    def prune_layer(self, ref, stats):
        keep = wanda_mask(ref.weight.detach(), stats.col_norm, self.config.ratio, self.config.pattern)
        ref.apply_mask(keep)
        return keep
