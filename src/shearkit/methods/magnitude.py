"""Magnitude pruning: zero the smallest |W| of each linear layer (the unstructured reference).

```yaml
prune: {method: magnitude, ratio: 0.5}      # or nm: "2:4"
```
Lifecycle: no calibration; each block's layers are thresholded on |W| over the whole layer
(N:M: the N smallest of every M consecutive inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..sparsity.magnitude import magnitude_mask
from . import register_method
from .blockwise import BlockwiseSparsifier, SparsityConfig


@dataclass
class MagnitudeConfig(SparsityConfig):
    """Magnitude has no options beyond the shared ones (ratio, nm)."""


@register_method
class Magnitude(BlockwiseSparsifier):
    """Magnitude: per-layer |W| threshold, unstructured or N:M."""

    name = "magnitude"
    config_cls = MagnitudeConfig
    needs_calibration = False
    stats_kind = None

    def prune_layer(self, ref, stats):
        keep = magnitude_mask(ref.weight.detach(), self.config.ratio, self.config.pattern)
        ref.apply_mask(keep)
        return keep
