"""FlexiGPT (Smith et al., NAACL 2025, arXiv 2501.14713): replace the least important blocks by
weight-shared copies of kept blocks, each with its own low-rank adapters and output norms.

Lifecycle of `run`:
1. score every block by Block Influence (or the perplexity drop) on the unpruned model and take
   the round(ratio x blocks) lowest (or `blocks: K`), as ShortGPT (`methods.blocks`);
2. for each taken block i, choose the kept block j whose weights are nearest by the paper's
   metric: per projection, the energy of Ŵ_i - Ŵ_j (rank-r truncations) that a rank-r adapter
   cannot absorb, summed over the block's projections (`importance.shared_base`);
3. turn block i into a copy of block j that shares j's weights by reference, with rank-r
   adapters on every projection initialised from the truncated SVD of W_i - W_j and a
   mean-centring output norm with a small learnable scale on the attention and MLP outputs
   (`surgery.shared_block`); block i keeps its place, its KV-cache slot and its input norms;
4. train only the adapters and the output-norm scales with the shared `Trainer` on
   pretraining-style text (`train`: fields of `recover`; default 128 steps x 4 x 256 tokens of
   `c4`, lr 1e-3, cosine).
The model keeps its depth and compute; it stores fewer parameters (the plan's `ratio_achieved`
is the fraction of the blocks' stored parameters removed, adapters and norms counted), and it
saves with its modeling file: `shearkit.load` and `from_pretrained(..., trust_remote_code=True)`
load it with each shared weight stored once.

Sample recipe (`recipes/flexigpt.yaml`):
```yaml
prune: {method: flexigpt, ratio: 0.3, rank: 32, train: {steps: 128, data: c4, seqlen: 256, batch_size: 4}}
```
Rank: the paper's r = 256 at hidden 4096 is hidden / 16; the default scales it, hidden / 16 rounded
down to a power of two (SmolLM2's 576 -> 36 -> 32; 4096 -> 256), capped at the smallest
projection's rank; a rank above that rank is refused (the distance would be 0 for every pair).
Ablations of the paper's Table 4: `select: plain` (base by ||W_i - W_j||_F, no low-rank step),
`output_norm: false`, `init: lora` (A random, B = 0 instead of the SVD init); `training: false`
stops after step 3 (the model "right after pruning").
Reconstructions (the paper leaves them open): the per-matrix distances are summed; the output
norm's scale starts at `norm_init` = 0.01 with eps 1e-5; the replacement's input RMSNorms are
block i's own, frozen; the adapter factors are B = U_r S_r, A = V_r^T with no extra scaling; the
training budget and lr are ours (the paper trains 1B SlimPajama tokens at lr 4e-3, batch 480).
Supported: the llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ShearkitError
from ..plan import Plan
from . import register_method
from .base import MethodContext
from .blocks import BlockConfig, BlockMethod

TRAIN_DEFAULTS = {"steps": 128, "data": "c4", "seqlen": 256, "batch_size": 4, "lr": 1e-3}


def default_rank(hidden: int) -> int:
    """The paper's r = hidden / 16 (256 at 4096), rounded down to a power of two (32 at 576)."""
    return 2 ** int(math.floor(math.log2(max(hidden / 16, 1))))


@dataclass
class FlexiGPTConfig(BlockConfig):
    """rank: adapter rank (None: `default_rank(hidden)`, capped at the smallest projection's rank);
    select: `lowrank` (the paper's base metric) or `plain` (full-weight distance, ablation);
    output_norm: the output norms on attention and MLP outputs; init: `svd` (adapter from the
    truncated SVD of W_i - W_j) or `lora` (B = 0); norm_init: the output norms' initial scale;
    training: train adapters and norm scales after building; train: the training run (fields of
    `recover`: steps, data, seqlen, batch_size, grad_accum, lr, ...)."""

    rank: int | None = None
    select: str = "lowrank"
    output_norm: bool = True
    init: str = "svd"
    norm_init: float = 1e-2
    training: bool = True
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from ..importance.shared_base import SELECTIONS
        from ..surgery.shared_block import INITS

        super().__post_init__()
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ShearkitError(f"prune.rank must be a whole number >= 1 (or unset for hidden / 16), got {self.rank!r}.")
        if self.select not in SELECTIONS:
            raise ShearkitError(f"prune.select must be one of {', '.join(SELECTIONS)}, got '{self.select}'.")
        if self.init not in INITS:
            raise ShearkitError(f"prune.init must be one of {', '.join(INITS)}, got '{self.init}'.")
        if not self.norm_init > 0:
            raise ShearkitError(f"prune.norm_init must be positive, got {self.norm_init}.")
        self.train_config(self.rank or 8)  # refuse bad training settings before any model work

    def train_config(self, rank: int):
        """The training run as a RecoverConfig (`rank` recorded for the run's summary)."""
        return shared_train_config(self.train, rank, self.seed, "prune")


def shared_train_config(train: dict[str, Any], rank: int, seed: int, section: str):
    """A RecoverConfig for training shared copies' adapters and norm scales: `train` (fields of
    `recover`, read from `<section>.train`) over `TRAIN_DEFAULTS`; peft's LoRA fields refused."""
    from ..recipe import build_config
    from ..recovery.config import RecoverConfig

    clash = sorted(set(train) & {"rank", "alpha", "dropout", "target_modules", "merge"})
    if clash:
        raise ShearkitError(f"{section}.train.{clash[0]} does not apply to shared blocks, which train their own "
                            f"adapters (set {section}.rank for their rank).")
    return build_config(RecoverConfig, {**TRAIN_DEFAULTS, **train, "rank": rank, "seed": seed}, f"{section}.train")


def resolve_rank(model, rank: int | None, key: str = "prune.rank") -> int:
    """The adapter rank: `rank`, or the default for the model's hidden size capped at the smallest
    projection's rank; a `rank` above that rank is refused (`key` names the setting in the message)."""
    from ..arch import get_adapter
    from ..importance.shared_base import max_rank

    top, which = max_rank(model)
    if rank is None:
        return min(default_rank(get_adapter(model).hidden_size), top)
    if rank > top:
        raise ShearkitError(f"{key}={rank} exceeds the rank of the smallest projection, {which}: at most {top} "
                            f"(an adapter cannot use more). Choose {key} <= {top}.")
    return rank


@register_method
class FlexiGPT(BlockMethod):
    """FlexiGPT: replace the lowest-BI blocks by weight-shared copies of kept blocks with low-rank adapters."""

    name = "flexigpt"
    config_cls = FlexiGPTConfig
    needs_calibration = True
    in_place = True
    smoke_options = {"train": {"steps": 2, "data": "ptb", "split": "validation", "seqlen": 16, "batch_size": 2}}

    def run(self, model, ctx: MethodContext) -> Plan:
        from ..arch.modules import unwrap
        from ..graph.groups import base_block_params
        from ..graph.removal import layer_params_after
        from ..importance.shared_base import choose_bases
        from ..recovery.loop import train_summary
        from ..surgery.shared_block import refuse_shared, refuse_split_sharing, share_block, train_only_shared_parts

        cfg = self.config
        m = unwrap(model)
        refuse_shared(m, "FlexiGPT")
        if cfg.training:
            refuse_split_sharing()  # before the model is changed: an FSDP launch that would split shared weights
        rank = resolve_rank(m, cfg.rank)
        with torch.no_grad():
            plan = self.plan_blocks(m, self.scores(m, ctx))
        pruned = list(plan.blocks)
        bases, distances = choose_bases(m, pruned, rank, cfg.select)
        before, layers_before = base_block_params(m), layer_params_after(m)
        torch.manual_seed(cfg.seed)  # `init: lora` draws A: the run is a function of the seed, not of the RNG's state
        for i in pruned:
            share_block(m, i, bases[i], rank, init=cfg.init, output_norm=cfg.output_norm, norm_init=cfg.norm_init)
        history = None
        if cfg.training:
            with train_only_shared_parts(m):
                trainer = ctx.trainer(m, cfg.train_config(rank), name="flexigpt", desc="flexigpt")
                history = trainer.fit(resume=ctx.resume)
        after, layers_after = base_block_params(m), layer_params_after(m)
        plan.blocks, plan.replaced = [], {str(i): bases[i] for i in pruned}
        plan.ratio_achieved = 1 - after / before
        plan.extra.update({
            "export": "shared-blocks", "rank": rank, "select": cfg.select,
            "params_removed": [b - a for b, a in zip(layers_before, layers_after)],
            "stored_block_params": {"before": before, "after": after},
            "replacements": [{"block": i, "base": bases[i], "rank": rank,
                              "distances": {str(j): d for j, d in distances[i].items()}} for i in pruned],
        })
        if history is not None:
            plan.extra["train"] = train_summary(history, "resumed_from")
        return plan
