"""LoRAShear (Chen et al., 2023, arXiv 2310.18356): knowledge distribution, LHSPG progressive
structured pruning over LoRA, and dynamic knowledge recovery, end to end.

Lifecycle of `run` (each stage checkpoints under the run directory, so a killed run resumes):
1. data: every slice is cut from disjoint partitions of the local sets (by documents/records):
   the knowledge-distribution held-out windows (`wiki`), the Taylor calibration windows (`c4`,
   proxy `taylor` only), each recovery source's held-out slice and the training windows;
2. the dense model's held-out perplexity per recovery source (the reference degradation is
   measured against);
3. knowledge distribution (`analysis.sensitivity.analyze`, Alg. 3): every node group (layer x
   attention / MLP) pruned alone at `trial_ratio`; the most sensitive fraction `gamma` kept whole,
   the others given targets (KV groups, MLP channels) that reach `ratio` of the blocks' parameters
   (gamma 0 skips the trials: every node group gives the same fraction); the finished trials are
   checkpointed every `analysis_save_every` (`<run>/lorashear/knowledge-distribution`);
4. LHSPG (`recovery.lhspg`, Alg. 4) through the shared `Trainer`: LoRA warm-up, then `periods`
   periods that each drive a share of every node group's target to zero, the rest learning on (a
   NaN/divergence stop here is an error naming the step: LHSPG's writes into the base weights
   cannot be rolled back to the last good step);
5. LoRA merged, the zeroed groups cut out physically (the shared surgery);
6. dynamic knowledge recovery (`recovery.dynamic`, Alg. 5) with fresh LoRA: rounds over a
   mixture whose weights follow each source's measured degradation, phase by phase.

Budget: `train.steps` (LHSPG, warm-up included) + `recovery.steps`; the recipe states the split
(`recipes/lorashear.yaml`: 64 + 64 steps of 4 x 256 tokens = the shared 131,072-token budget).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


from ..errors import ShearkitError
from ..plan import Plan
from ..recovery.loop import Callback
from .base import MethodContext
from .structured import StructuredConfig, StructuredMethod
from . import register_method

@dataclass
class LoRAShearConfig(StructuredConfig):
    """gamma / trial_ratio / proxy / analysis_windows / analysis_seqlen: the knowledge-distribution
    analysis (gamma 0: none); variant (`paper` | `decay`), warmup (fraction of train.steps before
    the first period), periods, epsilon, saliency (proxy weights): LHSPG; rank / alpha / dropout /
    target_modules: the LoRA of both stages; train: LHSPG's training run (fields of `recover`; its
    data are the first recovery phase's sources, in equal shares); recovery: the recovery run
    (fields of `recover`); dynamic: the mixture (fields of `recovery.dynamic.DynamicConfig`;
    `adaptive: false` keeps equal shares instead of following the measured degradation).
    analysis_save_every: with a run directory, the knowledge-distribution analysis checkpoints its
    finished trials (and the taylor proxy's gradient pass its batches) every this many (0: never)."""

    gamma: float = 0.1
    trial_ratio: float = 0.5
    proxy: str = "magnitude"
    analysis_windows: int = 8
    analysis_seqlen: int = 512
    variant: str = "paper"
    warmup: float = 0.125
    periods: int = 4
    epsilon: float = 0.05
    saliency: dict[str, float] | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)
    dynamic: dict[str, Any] = field(default_factory=dict)
    analysis_save_every: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.analysis_save_every < 0:
            raise ShearkitError(f"prune.analysis_save_every must be >= 0 (0: no checkpoints), got "
                                f"{self.analysis_save_every}.")
        from ..analysis.sensitivity import PROXIES
        from ..importance.lora_saliency import check_weights
        from ..recovery.lhspg import VARIANTS

        if not 0.0 <= self.gamma < 1.0:
            raise ShearkitError(f"prune.gamma must be in [0, 1), got {self.gamma}.")
        if not 0.0 < self.trial_ratio < 1.0:
            raise ShearkitError(f"prune.trial_ratio must be strictly between 0 and 1, got {self.trial_ratio}.")
        if self.proxy not in PROXIES:
            raise ShearkitError(f"prune.proxy must be one of {', '.join(PROXIES)}, got '{self.proxy}'.")
        if self.variant not in VARIANTS:
            raise ShearkitError(f"prune.variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'.")
        if not 0.0 <= self.warmup < 1.0:
            raise ShearkitError(f"prune.warmup must be a fraction of train.steps in [0, 1), got {self.warmup}.")
        if self.periods < 1:
            raise ShearkitError(f"prune.periods must be >= 1, got {self.periods}.")
        if self.attn_unit == "query_heads":
            raise ShearkitError("lorashear prunes KV groups and MLP channels; use attn_unit kv_group or none.")
        if self.analysis_windows < 1 or self.analysis_seqlen < 2:
            raise ShearkitError(f"prune.analysis_windows must be >= 1 and prune.analysis_seqlen >= 2, got "
                                f"{self.analysis_windows} and {self.analysis_seqlen}.")
        if self.saliency is not None:
            check_weights(self.saliency)
        self.dynamic_config()
        train, recovery = self.train_config(), self.recovery_config()
        if self.schedule(train.steps)[2] < 1:
            raise ShearkitError(f"prune.train.steps={train.steps} leaves no step per LHSPG period ({self.periods} "
                                f"periods after {self.schedule(train.steps)[0]} warm-up steps); raise steps or lower "
                                "periods.")
        if recovery.seqlen != train.seqlen:
            raise ShearkitError(f"prune.train.seqlen ({train.seqlen}) and prune.recovery.seqlen ({recovery.seqlen}) "
                                "must match: both stages draw from one mixture of training windows.")

    def schedule(self, steps: int) -> tuple[int, int, int]:
        """(warm-up steps, periods, steps per period) of LHSPG within `steps` training steps."""
        w = int(round(self.warmup * steps))
        return w, self.periods, (steps - w) // self.periods

    def _run_config(self, section: str, given: dict, defaults: dict):
        from ..recipe import build_config
        from ..recovery.config import RecoverConfig

        clash = sorted(set(given) & {"rank", "alpha", "dropout", "target_modules", "merge", "data"})
        if clash:
            where = "prune.dynamic.phases" if clash[0] == "data" else f"prune.{clash[0]}"
            raise ShearkitError(f"prune.{section}.{clash[0]} is set for the whole method ({where}); move it there.")
        return build_config(RecoverConfig, {**defaults, **given, "rank": self.rank, "alpha": self.alpha,
                                            "dropout": self.dropout, "target_modules": self.target_modules,
                                            "seed": self.seed, "data": "+".join(self.sources())},
                            f"prune.{section}")

    def train_config(self):
        """LHSPG's training run as a RecoverConfig."""
        return self._run_config("train", self.train, {"steps": 64, "seqlen": 256, "batch_size": 4})

    def recovery_config(self):
        """The dynamic recovery run as a RecoverConfig."""
        return self._run_config("recovery", self.recovery, {"steps": 64, "seqlen": 256, "batch_size": 4})

    def dynamic_config(self):
        """The recovery mixture's settings."""
        from ..recipe import build_config
        from ..recovery.dynamic_config import DynamicConfig

        return build_config(DynamicConfig, dict(self.dynamic), "prune.dynamic")

    def sources(self) -> list[str]:
        return [s for phase in self.dynamic_config().phases for s in phase]


class LHSPGState(Callback):
    """Checkpoints what LHSPG keeps beyond AdamW's state (selections, pruned groups, the base
    weights it wrote into or its forward scales), and logs each period's pruned counts."""

    name = "lhspg"

    def __init__(self):
        self.optimizer = None

    def attach(self, optimizer):
        self.optimizer = optimizer
        return optimizer

    def on_step_end(self, trainer, step: int, record: dict) -> None:
        opt = self.optimizer
        record["pruned_groups"] = sum(len(v) for v in opt.pruned.values())

    def state_dict(self) -> dict:
        return self.optimizer.lhspg_state() if self.optimizer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_lhspg_state(state)


def quotas_from(units: list[int], nodes) -> dict[tuple[str, int], int]:
    """(kind, layer) -> KV groups / MLP channels each node group loses, from its planner units."""
    out = {}
    for node, u in zip(nodes, units):
        n = sum(node.unit_sizes[:u])
        if n:
            out[("kv_group" if node.kind == "attn" else "mlp_channel", node.layer)] = n
    return out


@register_method
class LoRAShear(StructuredMethod):
    """LoRAShear: knowledge distribution, LHSPG structured pruning over LoRA, dynamic knowledge recovery."""

    name = "lorashear"
    config_cls = LoRAShearConfig
    needs_calibration = False
    in_place = True
    smoke_options = {"gamma": 0.15, "analysis_windows": 2, "analysis_seqlen": 16, "periods": 2, "warmup": 0.25,
                     "train": {"steps": 6, "seqlen": 256, "batch_size": 2},
                     "recovery": {"steps": 4, "seqlen": 256, "batch_size": 2},
                     "dynamic": {"round_steps": 2, "heldout_windows": 2, "heldout_seqlen": 16, "heldout_examples": 2}}

    def score(self, model, ctx, layers):  # pragma: no cover - LHSPG selects while it trains, see `run`
        raise ShearkitError("lorashear selects its groups while it trains; call run().")

    def run(self, model, ctx: MethodContext) -> Plan:
        from accelerate.utils import set_seed
        from peft import get_peft_model

        from ..analysis.sensitivity import analyze, plot_sensitivity
        from ..analysis.targets import allocate, block_params, node_units
        from ..arch.modules import unwrap
        from ..data.partition import windows
        from ..graph.groups import layer_groups
        from ..graph.planner import finish_plan
        from ..recovery.dynamic import build_sources, dense_reference, dynamic_recover
        from ..recovery.guard import diverged
        from ..recovery.lhspg import LHSPG
        from ..recovery.loop import Trainer, train_summary
        from ..recovery.lora import lora_config
        from ..recovery.mixture import MixtureSampler
        from ..recovery.sampling import process_count
        from ..surgery import apply_structured

        cfg = self.config
        tcfg, rcfg, dcfg = cfg.train_config(), cfg.recovery_config(), cfg.dynamic_config()
        base = unwrap(model)
        described = Plan.describe_base(base)
        dense_layers, _ = self.layout(base)
        work = ctx.work_dir("lorashear")

        # 1. disjoint data slices
        reserve: dict[str, dict[str, int]] = {}
        if cfg.gamma > 0:
            reserve.setdefault("wiki", {})["analysis"] = cfg.analysis_windows * cfg.analysis_seqlen
            if cfg.proxy == "taylor":
                reserve.setdefault("c4", {})["calib"] = cfg.analysis_windows * cfg.analysis_seqlen
        mixture, heldout, reserved = build_sources(
            ctx.tokenizer, dcfg.phases, seqlen=rcfg.seqlen, heldout_windows=dcfg.heldout_windows,
            heldout_seqlen=dcfg.heldout_seqlen, heldout_examples=dcfg.heldout_examples, reserve=reserve,
            seed=cfg.seed, data_dir=ctx.data_dir, train_examples=_most_drawn(process_count(base), tcfg, rcfg))

        # 2. the dense reference
        dense = _cached(work, "dense_reference.json", ctx.resume, lambda: dense_reference(base, ctx.tokenizer, heldout))

        # 3. knowledge distribution -> per node-group targets (the node groups it marks, layers kept dense
        #    and, with attn_unit none, attention are kept whole; the others reach the ratio)
        nodes = node_units(base, cfg.round_to)
        record, sensitivity, whole = None, None, set()
        if cfg.gamma > 0:
            def measure():
                held = windows(ctx.tokenizer, reserved["wiki"]["analysis"], cfg.analysis_windows, cfg.analysis_seqlen)
                cal = (windows(ctx.tokenizer, reserved["c4"]["calib"], cfg.analysis_windows, cfg.analysis_seqlen)
                       if cfg.proxy == "taylor" else None)
                return analyze(base, ctx.tokenizer, cfg.ratio, trial_ratio=cfg.trial_ratio, proxy=cfg.proxy,
                               gamma=cfg.gamma, round_to=cfg.round_to, seed=cfg.seed, heldout=held, calib_windows=cal,
                               dataset="wiki", calib="c4", resume=ctx.resume, save_every=cfg.analysis_save_every,
                               checkpoint=None if work is None else work / "knowledge-distribution")
            record = _cached(work, "knowledge_distribution.json", ctx.resume, measure)
            if work is not None:
                plot_sensitivity(record, work / "knowledge_distribution.png")
            whole = {j for j, r in enumerate(record["nodes"]) if r["unprunable"]}
            sensitivity = [r["relative_deviation"] for r in record["nodes"]]
        whole |= {j for j, n in enumerate(nodes) if n.layer in dense_layers or (n.kind == "attn" and cfg.attn_unit == "none")}
        quotas = quotas_from(allocate(nodes, whole, cfg.ratio, block_params(base), sensitivity), nodes)
        if not quotas:
            raise ShearkitError("Nothing is left to prune: raise prune.ratio, or keep fewer layers dense.")

        # 4. LHSPG
        set_seed(tcfg.seed)
        peft_model = get_peft_model(base, lora_config(base, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules))
        sets = {k: layer_groups(unwrap(peft_model), k[1], "kv_group")[k[0]] for k in quotas}
        warm, periods, per = cfg.schedule(tcfg.steps)
        state = LHSPGState()

        def make(params, c):
            return state.attach(LHSPG(params, peft_model, sets, quotas, lr=c.lr, weight_decay=c.weight_decay,
                                      warmup=warm, periods=periods, period_steps=per, variant=cfg.variant,
                                      epsilon=cfg.epsilon, saliency=cfg.saliency))

        first = dcfg.phases[0]
        sampler = MixtureSampler(mixture.ranges, tcfg.batch_size, tcfg.grad_accum, process_count(base), tcfg.seed)
        sampler.set_weights(0, {s: (1.0 / len(first) if s in first else 0.0) for s in mixture.ranges})
        trainer = Trainer(peft_model, ctx.tokenizer, mixture.data, tcfg, callbacks=[state], optimizer=make,
                          sampler=sampler, root=ctx.work_dir("lhspg"), data_dir=ctx.data_dir, desc="lhspg")
        lhspg_hist = trainer.fit(resume=ctx.resume)
        opt = state.optimizer
        if diverged(lhspg_hist):  # the base weights LHSPG wrote into cannot go back to the kept step
            raise ShearkitError(f"LoRAShear could not finish LHSPG. {lhspg_hist['stop_message']} LHSPG had pruned "
                                f"{sum(map(len, opt.pruned.values()))} of its {sum(quotas.values())} groups by then, "
                                f"so no model is produced; its training settings are prune.train.* (lr now "
                                f"{tcfg.lr:g}).")
        short = {f"{k[0]}.{k[1]}": (len(opt.pruned[k]), q) for k, q in quotas.items() if len(opt.pruned[k]) != q}
        if short:
            # the schedule forces every period's quota by its end and a divergence is reported above:
            # reaching this is a bug, not a setting to change
            raise RuntimeError(f"internal error, please report it: LHSPG stopped at step "
                               f"{lhspg_hist['steps_done']} of {tcfg.steps} ({lhspg_hist.get('stopped')}) before "
                               f"every target was reached ({short}).")
        opt.remove_scales()

        # 5. physical removal
        merged = peft_model.merge_and_unload()
        layers: dict[str, dict[str, list[int]]] = {}
        for (kind, i), pruned in opt.pruned.items():
            layers.setdefault(str(i), {})["kv_groups" if kind == "kv_group" else "mlp_channels"] = sorted(pruned)
        plan = Plan(self.name, "structured", cfg.ratio, base=described, config=cfg.to_dict(), layers=layers)
        finish_plan(merged, plan, dense=dense_layers)
        apply_structured(merged, plan)

        # 6. dynamic knowledge recovery
        set_seed(rcfg.seed)
        peft2 = get_peft_model(merged, lora_config(merged, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules))
        rec_hist = dynamic_recover(peft2, ctx.tokenizer, rcfg, dcfg, train=mixture, heldout=heldout, dense=dense,
                                   root=ctx.work_dir("dynamic-recovery"), resume=ctx.resume)
        peft2.merge_and_unload()

        plan.extra.update({
            "lhspg": {"variant": cfg.variant, "warmup_steps": warm, "periods": periods, "period_steps": per,
                      "quotas": {f"{k[0]}.{k[1]}": v for k, v in quotas.items()}, "history": opt.history,
                      "train": train_summary(lhspg_hist)},
            "recovery": {"adaptive": dcfg.adaptive, "rounds": rec_hist.get("rounds"), "dense_reference": dense,
                         "train": train_summary(rec_hist)},
            "data": {"sources": mixture.records, "disjoint": True},
        })
        # per-step / per-round series the run's report plots under "Method records"
        rounds = rec_hist.get("rounds") or []
        weighted = [r for r in rounds if r.get("weights")]
        plan.extra["lhspg_loss_by_step"] = list(lhspg_hist.get("losses") or [])
        if weighted:
            plan.extra["recovery_mix_weights_by_round"] = {s: [r["weights"][s] for r in weighted]
                                                           for s in weighted[0]["weights"]}
        if rounds:
            plan.extra["recovery_heldout_ppl_by_round"] = {"phase perplexity": [r["phase_ppl"] for r in rounds]}
        if record is not None:
            from ..analysis.sensitivity import deviation_series_of

            plan.extra["knowledge_distribution"] = deviation_series_of(record)
            plan.extra["unprunable"] = record["unprunable"]
        return plan


def _most_drawn(processes: int, *configs) -> int:
    """Examples both training stages draw in all over `processes` processes: the most one source of the
    mixture can give."""
    return sum(c.steps * c.batch_size * c.grad_accum for c in configs) * processes


def _cached(work, name: str, resume: bool, compute):
    """`compute()`, kept as JSON in the method's folder so a resumed run reuses it."""
    from ..io.atomic import write_json

    path = work / name if work is not None else None
    if resume and path is not None and path.is_file():
        return json.loads(path.read_text())
    value = compute()
    if path is not None:
        write_json(path, value)
    return value
