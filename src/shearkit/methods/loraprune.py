"""LoRAPrune (Zhang et al., 2023, arXiv 2305.18403): structured pruning while LoRA trains, guided by
the LoRA factors' gradients instead of the frozen weights'.

Lifecycle of `run`:
1. attach peft LoRA (r 8, alpha 16, dropout 0.05 on all block projections by default);
2. train with the shared `Trainer` for `train.steps` optimizer steps; at every step, after the
   gradients are unscaled and clipped and before the optimizer steps, score every KV group and
   MLP channel of the prunable layers from `G_hat = gB A + B gA - gB gA` times the effective
   weight (`importance.lora_grad`) and fold the scores into a moving average (0.9);
3. every `prune_every` steps, prune to the cubic schedule's ratio (none during the first
   `warmup` fraction of steps, the target from the last `cooldown` fraction on): the planner
   picks the lowest-scored units, already pruned ones stay pruned, and the masks change so the
   forward sees exactly the pruned model (`surgery.output_masks`);
4. merge LoRA and cut the pruned structures out physically (the shared surgery).
A NaN/divergence stop of the training (`recovery.guard`) before the schedule reached the target is
an error naming the step, and the model is given back without adapters or masks; after it, the
pruned model keeps the last good adapters and `plan.extra["train"]` records the stop.

Sample recipe (`recipes/loraprune.yaml`):
```yaml
prune: {method: loraprune, ratio: 0.2, train: {steps: 128, data: alpaca, seqlen: 256, batch_size: 4}}
```
`ratio` is the fraction of the decoder blocks' parameters removed, as for llm-pruner. Deviations
from the official code: under GQA a KV group (its k/v rows and every query head reading it) is
one unit, never k/v alone; allocation is global over the moving-average scores by default (the
official per-layer uniform allocation is `allocation: uniform`), and global allocation ranks the plain
first-order sums, since the official per-module L2 normalisation (kept with `uniform`) makes a
layer's few KV groups and its many channels incomparable; the last prune reaches the
target exactly (the official loop stops just below it); the first 10% of layers and the last
stay dense, as in the official code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ShearkitError
from ..importance.schedule import cubic_ratio
from ..plan import Plan
from ..recovery.guard import diverged
from ..recovery.loop import Callback, train_summary
from .base import MethodContext
from .structured import StructuredConfig, StructuredMethod, end_layers
from . import register_method


@dataclass
class LoRAPruneConfig(StructuredConfig):
    """ema: weight of the past in the moving-average scores (0 = the current step only);
    warmup / cooldown: fractions of the training steps before the first and after the last prune;
    prune_every: optimizer steps between prunes; normalize: divide each module's scores by their L2
    norm before adding them (the official code; None: with uniform allocation only, since normalised
    scores of a layer's 3 KV groups and its 1536 channels cannot be ranked against each other);
    rank/alpha/dropout/target_modules: the LoRA;
    train: the training run (fields of `recover`: steps, data, seqlen, batch_size, grad_accum, lr, ...).
    dense_first / dense_last: None keeps LoRAPrune's int(0.1 x layers) first and the last layer dense."""

    allocation: str = "global"
    dense_first: int | None = None
    dense_last: int | None = None
    ema: float = 0.9
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_every: int = 10
    normalize: bool | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema < 1.0:
            raise ShearkitError(f"prune.ema must be in [0, 1), got {self.ema}.")
        if not (0.0 <= self.warmup < 1.0 and 0.0 <= self.cooldown < 1.0 and self.warmup + self.cooldown < 1.0):
            raise ShearkitError(f"prune.warmup and prune.cooldown must be fractions in [0, 1) that sum to less than 1, "
                                f"got {self.warmup} and {self.cooldown}.")
        if self.prune_every < 1:
            raise ShearkitError(f"prune.prune_every must be >= 1, got {self.prune_every}.")
        if self.attn_unit == "query_heads":
            raise ShearkitError("loraprune scores KV groups and MLP channels; use attn_unit kv_group or none.")
        self.train_config()  # refuse bad training settings before any model work

    def train_config(self):
        """The training run as a RecoverConfig (the LoRA settings come from this config)."""
        from ..recipe import build_config
        from ..recovery.config import RecoverConfig

        clash = sorted(set(self.train) & {"rank", "alpha", "dropout", "target_modules", "merge"})
        if clash:
            raise ShearkitError(f"prune.train.{clash[0]} is set on prune itself (prune.{clash[0]}); move it there.")
        defaults = {"steps": 128, "data": "alpaca", "seqlen": 256, "batch_size": 4}
        return build_config(RecoverConfig, {**defaults, **self.train, "rank": self.rank, "alpha": self.alpha,
                                            "dropout": self.dropout, "target_modules": self.target_modules,
                                            "seed": self.seed}, "prune.train")


class LoRAPruneScores(Callback):
    """The trainer callback: moving-average LoRA-guided scores, the schedule, and the masks."""

    name = "loraprune"

    def __init__(self, model, method: "LoRAPrune", layers: list[int], steps: int):
        from ..graph.groups import layer_groups
        from ..surgery.output_masks import StructuredMasks

        self.model, self.method, self.cfg, self.steps = model, method, method.config, steps
        self.normalize = self.cfg.allocation == "uniform" if self.cfg.normalize is None else self.cfg.normalize
        self.sets = {(kind, i): gs for i in layers
                     for kind, gs in layer_groups(model, i, self.cfg.attn_unit).items()}
        if self.cfg.attn_unit == "none":
            self.sets = {k: v for k, v in self.sets.items() if k[0] == "mlp_channel"}
        self.ema = {k: torch.zeros(gs.size) for k, gs in self.sets.items()}
        self.plan: Plan | None = None
        self.ratio = 0.0  # ratio the masks have reached
        self.final = False
        self.skipped = 0  # steps whose scores were not finite
        self.history: list[dict] = []
        self.masks = StructuredMasks(model)

    # -- trainer hooks ----------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, step: int) -> None:
        from ..importance.lora_grad import lora_group_scores

        fresh = lora_group_scores(self.model, self.sets, normalize=self.normalize)
        if all(bool(torch.isfinite(v).all()) for v in fresh.values()):
            b = self.cfg.ema
            for k, v in fresh.items():
                self.ema[k].mul_(b).add_(v, alpha=1 - b)
        else:  # as the official code: a step with a non-finite score does not update them
            self.skipped += 1
        r = cubic_ratio(step, self.steps, self.cfg.ratio, warmup=self.cfg.warmup, cooldown=self.cfg.cooldown)
        due = step % self.cfg.prune_every == 0 and self.ratio < r < self.cfg.ratio
        if due or (r >= self.cfg.ratio and not self.final):
            self.prune_to(r, step)

    def on_train_end(self, trainer, history: dict) -> None:
        # stopped early by a callback: the target is still reached, from the scores so far; after a
        # NaN/divergence stop those scores are not trusted, and `run` refuses to finish
        if not self.final and not diverged(history):
            self.prune_to(self.cfg.ratio, trainer.step)

    def state_dict(self) -> dict:
        st: dict[str, Any] = {f"ema.{k}.{i}": v for (k, i), v in self.ema.items()}
        st.update(ratio=self.ratio, final=self.final, skipped=self.skipped, history=self.history,
                  plan=self.plan.to_dict() if self.plan is not None else None)
        return st

    def load_state_dict(self, state: dict) -> None:
        for (k, i) in self.ema:
            self.ema[(k, i)] = state[f"ema.{k}.{i}"].clone().float()
        self.ratio, self.final, self.skipped = state["ratio"], state["final"], state["skipped"]
        self.history = list(state["history"])
        self.plan = Plan.from_dict(state["plan"]) if state["plan"] is not None else None
        if self.plan is not None:
            self.masks.update(self.plan)

    # -- pruning ----------------------------------------------------------------------------
    def _scores(self) -> dict:
        """The moving-average scores, with already pruned units first in line (they stay pruned)."""
        scores = {k: v.clone() for k, v in self.ema.items()}
        if self.plan is not None:
            for key, e in self.plan.layers.items():
                i = int(key)
                for kind, field_ in (("mlp_channel", "mlp_channels"), ("kv_group", "kv_groups")):
                    if (kind, i) in scores and e.get(field_):
                        scores[(kind, i)][e[field_]] = -math.inf
        return scores

    def prune_to(self, ratio: float, step: int) -> None:
        """Mask the lowest-scored units so that `ratio` of the blocks' parameters are gone."""
        target = max(ratio, self.plan.ratio_achieved if self.plan is not None else 0.0)
        plan = self.method.plan_from(self.model, self._scores(), target)
        if self.plan is not None:
            _check_superset(self.plan, plan)
        self.plan, self.ratio = plan, ratio
        self.final = ratio >= self.cfg.ratio
        self.masks.update(plan)
        self.history.append({"step": step, "ratio": ratio, "ratio_achieved": plan.ratio_achieved})


def _check_superset(old, new) -> None:
    for key, e in old.layers.items():
        n = new.layers.get(key, {})
        for f in ("mlp_channels", "kv_groups", "heads"):
            if not set(e.get(f, [])) <= set(n.get(f, [])):
                raise RuntimeError(f"internal error, please report it: a later prune dropped pruned {f} of layer {key}.")


@register_method
class LoRAPrune(StructuredMethod):
    """LoRAPrune: structured pruning during LoRA training, importance from the LoRA gradients."""

    name = "loraprune"
    config_cls = LoRAPruneConfig
    needs_calibration = False
    in_place = True
    smoke_options = {"train": {"steps": 6, "data": "ptb", "split": "validation", "seqlen": 16, "batch_size": 2},
                     "prune_every": 2}

    def dense_layers(self, num_layers: int) -> list[int]:
        """First int(0.1 x layers) and the last layer, unless the config says otherwise."""
        cfg = self.config
        first = int(0.1 * num_layers) if cfg.dense_first is None else cfg.dense_first
        last = 1 if cfg.dense_last is None else cfg.dense_last
        return end_layers(num_layers, first, last)

    def run(self, model, ctx: MethodContext):
        from accelerate.utils import set_seed
        from peft import get_peft_model

        from ..arch import get_adapter
        from ..arch.modules import unwrap
        from ..recovery.lora import lora_config
        from ..surgery import apply_structured

        cfg = self.config
        tcfg = cfg.train_config()
        base = unwrap(model)
        dense, _ = self.layout(base)
        layers = [i for i in range(get_adapter(base).num_layers) if i not in dense]
        if not layers:
            raise ShearkitError(f"Every layer is kept dense ({len(dense)}); lower prune.dense_first / dense_last.")
        described = Plan.describe_base(base)
        set_seed(tcfg.seed)  # the LoRA factors' initialisation is part of a reproducible run
        peft_model = get_peft_model(base, lora_config(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules))
        scores = LoRAPruneScores(peft_model, self, layers, tcfg.steps)
        try:
            trainer = ctx.trainer(peft_model, tcfg, callbacks=[scores], name="loraprune", desc="loraprune")
            history = trainer.fit(resume=ctx.resume)
        except BaseException:
            scores.masks.remove()  # (before unloading: the hooks sit on the adapted modules)
            peft_model.unload()  # an error mid-training gives the model back as it was, without adapters
            raise
        scores.masks.remove()
        if diverged(history) and not scores.final:
            peft_model.unload()  # the model as given: the masks are gone, the base weights untouched
            raise ShearkitError(f"LoRAPrune could not finish. {history['stop_message']} The schedule had pruned "
                                f"ratio {scores.ratio:.3g} of prune.ratio {cfg.ratio:g} by then, so no model is "
                                f"produced; the training settings are prune.train.* (lr now {tcfg.lr:g}).")
        plan = scores.plan
        plan.base, plan.ratio_target = described, cfg.ratio  # the model as given, the ratio asked for
        merged = peft_model.merge_and_unload()
        apply_structured(merged, plan)
        plan.extra.update({"schedule": scores.history, "skipped_steps": scores.skipped,
                           "normalized_scores": scores.normalize,
                           "train": train_summary(history)})
        return plan

    def score(self, model, ctx, layers):  # pragma: no cover - scores come from training, see `run`
        raise ShearkitError("loraprune scores its groups while it trains; call run().")
