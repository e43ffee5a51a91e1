"""SparseGPT (Frantar & Alistarh, 2023; arXiv 2301.00774): OBS pruning with weight updates.

```yaml
prune: {method: sparsegpt, ratio: 0.5, blocksize: 128, damp: 0.01}   # or nm: "2:4"
calib: {dataset: c4, samples: 64, seqlen: 512}
```
Lifecycle: blockwise; for each block the input Hessian of every layer is accumulated on the
block's inputs (outputs of the already pruned blocks), then each layer is pruned column by
column with the inverse-Hessian compensation of the kept weights (`sparsity.sparsegpt`).
Because kept weights change, re-applying only the masks of a SparseGPT plan to the base model
reproduces the pattern but not the weights: keep the saved model.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ShearkitError
from ..sparsity.sparsegpt import sparsegpt_prune
from . import register_method
from .blockwise import BlockwiseSparsifier, SparsityConfig


@dataclass
class SparseGPTConfig(SparsityConfig):
    """`blocksize`: columns per lazy-update block (128 as in the paper; larger is faster on GPU,
    same result up to rounding). `damp`: diagonal dampening as a fraction of mean(diag H)."""

    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize < 1 or not 0 < self.damp < 1:
            raise ShearkitError(f"prune.blocksize must be >= 1 and prune.damp in (0, 1) "
                                f"(got {self.blocksize}, {self.damp}).")


@register_method
class SparseGPT(BlockwiseSparsifier):
    """SparseGPT: Hessian-based one-shot pruning with OBS weight reconstruction."""

    name = "sparsegpt"
    config_cls = SparseGPTConfig
    stats_kind = "hessian"
    updates_weights = True

    def prune_layer(self, ref, stats):
        c = self.config
        w, keep = sparsegpt_prune(ref.weight.detach(), stats.hessian, c.ratio, c.pattern, c.blocksize, c.damp)
        ref.set_weight(w)
        return keep
