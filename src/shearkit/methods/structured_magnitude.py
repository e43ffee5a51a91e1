"""Structured magnitude pruning: remove the heads / KV groups and MLP channels of smallest weight norm.

A data-free baseline over the shared structured machinery (groups -> scores -> plan -> surgery).
Weight magnitude is a poor guide on some models (SmolLM2 has low-norm MLP channels that matter a
great deal), so expect it to trail the gradient-based `llm-pruner` by a wide margin.

Sample recipe:
```yaml
prune: {method: structured-magnitude, ratio: 0.2, norm: 2, allocation: uniform, attn_unit: kv_group}
```
Lifecycle: `run` scores every group from its weights alone, builds the plan; `shearkit.prune`
then slices the model with `apply_plan`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ShearkitError
from ..graph.groups import layer_groups, unwrap
from ..graph.planner import StructuredConfig, dense_layers, plan_structured
from ..importance import magnitude
from . import PruneMethod, register_method


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
class StructuredMagnitude(PruneMethod):
    """Structured pruning by group weight magnitude (heads / KV groups, MLP channels)."""

    name = "structured-magnitude"
    kind = "structured"
    config_cls = StructuredMagnitudeConfig
    needs_calibration = False

    def run(self, model, tokenizer, calib):
        cfg = self.config
        m = unwrap(model)
        from ..arch import get_adapter

        L = get_adapter(m).num_layers
        dense = set(dense_layers(L, cfg.dense_first, cfg.dense_last))
        scores = {}
        for i in range(L):
            if i in dense:
                continue
            for kind, gs in layer_groups(m, i, cfg.attn_unit).items():
                scores[(kind, i)] = magnitude(m, gs, p=cfg.norm, aggregation=cfg.aggregation)
        return plan_structured(m, scores, cfg, method=self.name)
