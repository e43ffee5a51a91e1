"""LLM-Pruner (Ma et al., 2023, arXiv 2305.11627): first-order Taylor importance of coupled groups.

Gradients of the language-modelling loss on a few calibration windows score every group as
|ΔL| ≈ Σ|w · ∂L/∂w| (element-wise) or |Σ w · ∂L/∂w| (vector-wise), the slices of a group combined
by `aggregation`; the lowest-scored heads / KV groups and MLP channels are removed, the first and
last layers kept dense (LLM-Pruner keeps 4 and 2 of LLaMA-7B's 32).

Sample recipe:
```yaml
prune: {method: llm-pruner, ratio: 0.2, taylor: element, aggregation: sum, max_calib: 16}
calib: {dataset: c4, samples: 16, seqlen: 512}
```
Lifecycle (`methods.structured.StructuredMethod.run`): `score` makes one forward/backward pass
over the calibration windows (gradients of the block weights, accumulated) and scores the groups
of the layers not kept dense; the shared planner builds the plan; `shearkit.prune` then slices.

Deviations from the paper: ratio here is the fraction of the decoder blocks' parameters removed
(reached globally and reported exactly), not a per-layer unit fraction; GQA models prune whole KV
groups (or equal query heads per KV head), never k/v alone; the second-order (Hessian-diagonal)
variants are not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ShearkitError
from ..importance import TAYLOR_VARIANTS, collect_stats, taylor
from . import register_method
from .structured import StructuredConfig, StructuredMethod, group_scores


@dataclass
class LLMPrunerConfig(StructuredConfig):
    """taylor: `element` or `vector`; aggregation: sum|mean|max|prod; max_calib: windows used for
    the gradients (LLM-Pruner uses 10); batch_size: windows per backward pass. dense_first/last
    default to LLM-Pruner's proportion of kept layers. allocation defaults to `global` (with the
    dense layers both allocations export per-layer widths; `allocation: uniform, dense_first: 0,
    dense_last: 0` gives a vanilla export). docs/benchmarks.md compares the variants on SmolLM2-135M
    (`bench/bench_llm_pruner_variants.py`). checkpointing / loss_chunk: the gradient pass recomputes
    activations and runs the output head in chunks (the same scores at a fraction of the memory).
    save_every: with a run directory, the gradient pass checkpoints its accumulated gradients every
    this many batches and after the last (`<run>/llm-pruner/gradients`; 0: never), so that
    `--resume` continues it to the same scores."""

    allocation: str = "global"
    taylor: str = "element"
    aggregation: str = "sum"
    max_calib: int = 16
    batch_size: int = 1
    dense_first: int | None = None
    dense_last: int | None = None
    checkpointing: bool = True  # recompute activations in the gradient pass: same scores, less memory
    loss_chunk: int = 256  # output head on this many tokens at a time (0: full logits); same scores
    save_every: int = 8  # batches between checkpoints of the gradient pass (with a run directory; 0: never)

    def __post_init__(self):
        super().__post_init__()
        if self.loss_chunk < 0:
            raise ShearkitError(f"prune.loss_chunk must be 0 (off) or a number of tokens, got {self.loss_chunk}.")
        if self.taylor not in TAYLOR_VARIANTS:
            raise ShearkitError(f"prune.taylor must be one of {', '.join(TAYLOR_VARIANTS)}, got '{self.taylor}'.")
        if self.max_calib < 1 or self.batch_size < 1:
            raise ShearkitError(f"prune.max_calib and prune.batch_size must be >= 1, got {self.max_calib} and "
                                f"{self.batch_size}.")
        if self.save_every < 0:
            raise ShearkitError(f"prune.save_every must be >= 0 (0: no checkpoints), got {self.save_every}.")


@register_method
class LLMPruner(StructuredMethod):
    """LLM-Pruner: structured pruning by first-order Taylor importance (calibration gradients)."""

    name = "llm-pruner"
    config_cls = LLMPrunerConfig
    dense_default = "llm-pruner"
    needs_calibration = True
    needs_grad = True

    def score(self, model, ctx, layers):
        cfg = self.config
        if ctx.calib is None:
            raise ShearkitError("llm-pruner needs calibration tokens (gradients of the LM loss): give the MethodContext "
                                "calibration windows (calib=), or run it with shearkit.prune, which draws them.")
        stats = collect_stats(model, ctx.calib[: cfg.max_calib], grads=True, batch_size=cfg.batch_size,
                              desc="llm-pruner gradients", checkpointing=cfg.checkpointing,
                              loss_chunk=cfg.loss_chunk, save_every=cfg.save_every, resume=ctx.resume,
                              checkpoint=None if ctx.run_dir is None else Path(ctx.run_dir) / self.name / "gradients")
        self.extra.update(calib_loss=stats.loss, calib_tokens=stats.n_tokens)
        return group_scores(model, layers, cfg.attn_unit,
                            lambda m, gs: taylor(m, gs, stats, variant=cfg.taylor, aggregation=cfg.aggregation))
