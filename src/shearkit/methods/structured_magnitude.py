"""Structured magnitude pruning: remove the heads / KV groups and MLP channels of smallest weight norm.

A data-free baseline over the shared structured machinery (groups -> scores -> plan -> surgery).
Weight magnitude is a poor guide on some models (SmolLM2 has low-norm MLP channels that matter a
great deal), so expect it to trail the gradient-based `llm-pruner` by a wide margin.

Sample recipe:
```yaml
prune: {method: structured-magnitude, ratio: 0.2, norm: 2, allocation: uniform, attn_unit: kv_group}
```
Lifecycle (`methods.structured.StructuredMethod.run`): `score` scores every group from its
weights alone; the shared planner builds the plan; `shearkit.prune` then slices the model.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ShearkitError
from ..importance import magnitude
from . import register_method
from .structured import StructuredConfig, StructuredMethod, group_scores


@dataclass
class StructuredMagnitudeConfig(StructuredConfig):
    """norm: 1 (sum |w|) or 2 (sum w^2) over each group's slices; aggregation: sum|mean|max|prod."""

    norm: int = 2
    aggregation: str = "sum"

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in (1, 2):
            raise ShearkitError(f"prune.norm must be 1 or 2, got {self.norm}.")


@register_method
class StructuredMagnitude(StructuredMethod):
    """Structured pruning by group weight magnitude (heads / KV groups, MLP channels)."""

    name = "structured-magnitude"
    config_cls = StructuredMagnitudeConfig
    needs_calibration = False
    lazy_ok = True  # scores and cuts one block at a time from its weights alone

    def score(self, model, ctx, layers):
        cfg = self.config
        return group_scores(model, layers, cfg.attn_unit,
                            lambda m, gs: magnitude(m, gs, p=cfg.norm, aggregation=cfg.aggregation))
