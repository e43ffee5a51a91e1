"""The base of block methods (kind `blocks`): score whole decoder blocks, choose the lowest.

A block method removes (ShortGPT) or replaces (FlexiGPT, later) whole decoder blocks. What they
share lives here: the config (`ratio` or `blocks`, the importance and how it is computed), the
block count, the scores (`importance.blocks`) and the plan. The count follows the papers'
convention: `ratio: R` selects round(R x number of blocks) blocks (nearest, halves rounded up;
SmolLM2-135M's 30 blocks at 0.3 give 9); `blocks: K` sets the count directly and, when given,
takes precedence over `ratio`. The plan's `ratio_target` is R (or K / blocks), its
`ratio_achieved` the fraction of the blocks' stored parameters removed, recounted from the
shapes (equal to the block fraction when every block has the same size); `plan.extra` keeps the
score of every block (`block_scores`, plotted per block in the run's report).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..graph.planner import finish_plan
from ..importance.blocks import BLOCK_IMPORTANCE, ScoreCheckpoint, block_scores
from ..plan import Plan
from .base import MethodContext, PruneConfig, PruneMethod


@dataclass
class BlockConfig(PruneConfig):
    """Options shared by block methods.

    ratio: the fraction of blocks chosen, round(ratio x blocks). blocks: the number of blocks
        chosen (overrides ratio). importance: `bi` (Block Influence, 1 - cos(input, output)
        per token) or `ppl` (perplexity rise when the block alone is skipped).
    ppl_samples: calibration windows used by `ppl` (one forward over them per block).
    batch_size: calibration windows per forward. device / offload_activations: where `bi` runs
        its blocks (None: where the model is) and whether activations stay on the CPU.
    save_every: with a run directory, checkpoint the scoring every this many blocks (0: never), in
        `<run>/<method>/block-scores/`; `--resume` goes on from there.
    """

    blocks: int | None = None
    importance: str = "bi"
    ppl_samples: int = 8
    batch_size: int = 1
    device: str | None = None
    offload_activations: bool = False
    save_every: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.save_every < 0:
            raise ShearkitError(f"prune.save_every must be >= 0 blocks (0: no checkpoints), got {self.save_every}.")
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int)
                                        or self.blocks < 1):
            raise ShearkitError(f"prune.blocks must be a whole number of blocks >= 1, got {self.blocks!r}.")
        if self.importance not in BLOCK_IMPORTANCE:
            raise ShearkitError(f"prune.importance must be one of {', '.join(BLOCK_IMPORTANCE)}, "
                                f"got '{self.importance}'.")
        if self.ppl_samples < 1 or self.batch_size < 1:
            raise ShearkitError(f"prune.ppl_samples and prune.batch_size must be >= 1, got {self.ppl_samples} and "
                                f"{self.batch_size}.")


def block_count(num_blocks: int, ratio: float, blocks: int | None = None) -> int:
    """How many of `num_blocks` blocks a block method takes: `blocks`, else round(ratio x
    num_blocks) (halves up); refused unless at least one block is taken and one stays."""
    k = blocks if blocks is not None else math.floor(ratio * num_blocks + 0.5 + 1e-9)
    if not 1 <= k <= num_blocks - 1:
        asked = f"prune.blocks={blocks}" if blocks is not None else f"ratio {ratio} (round({ratio} x {num_blocks}) = {k})"
        raise ShearkitError(f"{asked} selects {k} of the model's {num_blocks} blocks; choose between 1 and "
                            f"{num_blocks - 1} blocks (a ratio from {0.5 / num_blocks:.3f} to "
                            f"{(num_blocks - 1.5) / num_blocks:.3f}, or prune.blocks=K).")
    return k


def lowest(scores: list[float], k: int) -> list[int]:
    """Indices of the `k` lowest scores (ties: the earlier block first), sorted."""
    order = torch.argsort(torch.tensor(scores, dtype=torch.float64), stable=True).tolist()
    return sorted(order[:k])


class BlockMethod(PruneMethod):
    """Base of block methods: `run` scores every block and plans to remove the lowest."""

    config_cls: ClassVar[type] = BlockConfig

    def scores(self, model, ctx: MethodContext) -> list[float]:
        """One score per block (higher: more important) by the config's `importance`."""
        cfg = self.config
        if ctx.calib is None:
            raise ShearkitError(f"{self.name} needs calibration tokens to score its blocks: give the MethodContext "
                                "calibration windows (calib=), or run it with shearkit.prune, which draws them.")
        tokens = ctx.calib[: cfg.ppl_samples] if cfg.importance == "ppl" else ctx.calib
        checkpoint = None
        if ctx.run_dir is not None and cfg.save_every:
            checkpoint = ScoreCheckpoint(Path(ctx.run_dir) / self.name / "block-scores", model, tokens,
                                         importance=cfg.importance, batch_size=cfg.batch_size,
                                         save_every=cfg.save_every, resume=ctx.resume)
        return block_scores(model, tokens, cfg.importance, batch_size=cfg.batch_size, device=cfg.device,
                            offload_activations=cfg.offload_activations, checkpoint=checkpoint)

    def plan_blocks(self, model, scores: list[float]) -> Plan:
        """The plan that removes the lowest-scored blocks, with the achieved parameter ratio."""
        cfg = self.config
        m = unwrap(model)
        n = get_adapter(m).num_layers
        if len(scores) != n:
            raise ShearkitError(f"{len(scores)} block scores for a model with {n} blocks; give one score per block "
                                "of this model (scores of another model do not fit it).")
        k = block_count(n, cfg.ratio, cfg.blocks)
        plan = Plan(method=self.name, kind="blocks", ratio_target=cfg.ratio if cfg.blocks is None else k / n,
                    base=Plan.describe_base(m), config=cfg.to_dict(), blocks=lowest(scores, k))
        finish_plan(m, plan)
        plan.extra["block_scores"] = {cfg.importance: [float(s) for s in scores]}
        return plan

    def run(self, model, ctx: MethodContext) -> Plan:
        with torch.no_grad():
            return self.plan_blocks(model, self.scores(model, ctx))
