"""The structured-method base: dense layers, a score hook, allocation and the shared planner.

A structured method is a config (a `StructuredConfig` subclass) plus a `StructuredMethod`
subclass that implements `score(model, ctx, layers)`: one score per group (`mlp_channel`,
`kv_group` and, with `attn_unit: query_heads`, `query_head`) for each layer it is given.
`run` decides the dense layers (`dense_layers`: `dense_first` / `dense_last`, or a method's own
rule), asks for the scores of the others and plans with `graph.planner.plan_structured`;
`shearkit.prune` then slices the model. A method that prunes while it trains overrides `run`
and reuses the parts (`dense_layers`, `load_layer_ratios`, `group_scores`, the planner).

Allocation (`prune.allocation`): `uniform` (the same fraction of every prunable layer),
`global` (units ranked across layers by score per parameter), or the path of a JSON file of
relative per-layer ratios, `{"layer_ratios": [r_0, ..., r_{L-1}]}` with one number >= 0 per
decoder layer: layer i loses the fraction min(1, c * r_i) of its units, c found so that the
blocks lose `ratio` of their parameters; a layer with r_i = 0 stays dense. Layers kept dense by
`dense_first` / `dense_last` stay dense whatever their ratio. The file may also give per-kind
ratios, `"attn_ratios"` and `"mlp_ratios"` (one number >= 0 per layer each, as `shearkit analyze`
writes them); then structure (i, kind) loses min(1, c * r_(i,kind)) of its units, and a 0 keeps
just that structure dense.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..graph.groups import GroupSet, layer_groups
from ..graph.planner import ALLOCATIONS, ATTN_UNITS, kept_dense, plan_structured
from ..plan import Plan
from .base import MethodContext, PruneConfig, PruneMethod

DENSE_DEFAULTS = ("none", "llm-pruner")


@dataclass
class StructuredConfig(PruneConfig):
    """Options shared by structured methods.

    allocation: `uniform` (same widths in every prunable layer; with no dense layers the saved
        model loads in vanilla transformers), `global` (units ranked across layers), or the path
        of a JSON file `{"layer_ratios": [...]}` of relative per-layer ratios (module docstring).
    attn_unit: `kv_group` (removes KV heads with their query heads: smaller KV cache),
        `query_heads` (equal number of query heads per KV head) or `none`.
    dense_first / dense_last: layers at each end kept dense; None = the method's default
        (LLM-Pruner's proportion, 4 and 2 of 32 layers rounded, for methods that follow it, else 0).
    round_to: kept MLP widths are multiples of this (8 suits tensor cores); 1 disables.
    """

    allocation: str = "uniform"
    attn_unit: str = "kv_group"
    dense_first: int | None = 0
    dense_last: int | None = 0
    round_to: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.allocation not in ALLOCATIONS:
            load_layer_ratios(self.allocation)  # a file of per-layer ratios: refused now if unreadable
            load_kind_ratios(self.allocation)
        if self.attn_unit not in ATTN_UNITS:
            raise ShearkitError(f"prune.attn_unit must be one of {', '.join(ATTN_UNITS)}, got '{self.attn_unit}'.")
        if self.round_to < 1:
            raise ShearkitError(f"prune.round_to must be >= 1, got {self.round_to}.")
        for k in ("dense_first", "dense_last"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ShearkitError(f"prune.{k} must be >= 0, got {v}.")


def load_layer_ratios(path: str, num_layers: int | None = None) -> list[float]:
    """The relative per-layer ratios in JSON file `path` (`{"layer_ratios": [...]}`), checked."""
    f = Path(path)
    what = ("prune.allocation must be 'uniform', 'global' or the path of a JSON file "
            '{"layer_ratios": [r_0, ..., r_(L-1)]} (one number >= 0 per decoder layer)')
    if not f.is_file():
        raise ShearkitError(f"{what}; '{path}' is neither a known allocation nor an existing file.")
    try:
        data = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShearkitError(f"{what}; {path} is not readable JSON ({e}).") from None
    ratios = data.get("layer_ratios") if isinstance(data, dict) else None
    if (not isinstance(ratios, list) or not ratios
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
                       for r in ratios)):
        raise ShearkitError(f'{what}; {path} has no "layer_ratios" list of numbers >= 0.')
    if not any(r > 0 for r in ratios):
        raise ShearkitError(f"{path}: every layer ratio is 0, which prunes nothing; give at least one layer a ratio > 0.")
    if num_layers is not None and len(ratios) != num_layers:
        raise ShearkitError(f"{path} gives {len(ratios)} layer ratios, but the model has {num_layers} decoder "
                            "layers; give one ratio per layer.")
    return [float(r) for r in ratios]


KIND_KEYS = {"attn": "attn_ratios", "mlp": "mlp_ratios"}


def load_kind_ratios(path: str, num_layers: int | None = None) -> dict[str, list[float]] | None:
    """The per-kind ratios of allocation file `path` (`attn_ratios` and `mlp_ratios`), or None
    when it gives per-layer ratios only; checked like `layer_ratios`."""
    data = json.loads(Path(path).read_text())
    given = [k for k in KIND_KEYS.values() if k in data]
    if not given:
        return None
    if len(given) == 1:
        raise ShearkitError(f"{path} gives {given[0]} without {({*KIND_KEYS.values()} - set(given)).pop()}; "
                            "per-kind allocations need both.")
    out = {}
    for kind, key in KIND_KEYS.items():
        r = data[key]
        if (not isinstance(r, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) and x >= 0 for x in r)):
            raise ShearkitError(f'{path}: "{key}" must be a list of numbers >= 0, one per decoder layer.')
        if num_layers is not None and len(r) != num_layers:
            raise ShearkitError(f"{path} gives {len(r)} {key}, but the model has {num_layers} decoder layers; give "
                                "one ratio per layer in each list.")
        out[kind] = [float(x) for x in r]
    return out


def end_layers(num_layers: int, first: int | None, last: int | None, default: str = "none") -> list[int]:
    """Indices of the layers kept dense; None for `first`/`last` means `default`'s proportion
    ("llm-pruner": 4 first and 2 last of 32 layers, rounded; "none": 0)."""
    if default not in DENSE_DEFAULTS:
        raise ShearkitError(f"dense_default must be one of {', '.join(DENSE_DEFAULTS)}, got '{default}'.")
    scaled = default == "llm-pruner"
    if first is None:
        first = round(num_layers * 4 / 32) if scaled else 0
    if last is None:
        last = round(num_layers * 2 / 32) if scaled else 0
    keep = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    return sorted(keep)


def group_scores(model, layers: list[int], attn_unit: str,
                 fn: Callable[[torch.nn.Module, GroupSet], torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
    """`fn(model, groups)` for every group kind the planner needs in each of `layers` (each layer's block
    in memory while it is scored: a lazy model's read from disk)."""
    from ..arch import get_adapter
    from ..io.lazy import loaded_block

    m = unwrap(model)
    blocks = get_adapter(m).layers
    out: dict[tuple[str, int], torch.Tensor] = {}
    for i in layers:
        with loaded_block(m, blocks[i]):
            out.update({(kind, i): fn(m, gs) for kind, gs in layer_groups(m, i, attn_unit).items()})
    return out


class StructuredMethod(PruneMethod):
    """Base of the structured methods: subclasses implement `score` (see the module docstring)."""

    config_cls: ClassVar[type] = StructuredConfig
    dense_default: ClassVar[str] = "none"  # "none" | "llm-pruner": what dense_first/last=None mean

    def __init__(self, config: StructuredConfig):
        super().__init__(config)
        self.extra: dict = {}  # what score() wants recorded in the plan's extra

    def dense_layers(self, num_layers: int) -> list[int]:
        """Layers kept dense (not scored, never pruned): `dense_first` / `dense_last`, None meaning
        `dense_default`'s proportion. A method with a rule of its own overrides this."""
        return end_layers(num_layers, self.config.dense_first, self.config.dense_last, self.dense_default)

    def score(self, model, ctx: MethodContext, layers: list[int]) -> dict[tuple[str, int], torch.Tensor]:
        """(kind, layer) -> one score per group (higher: more important) for each of `layers`."""
        raise NotImplementedError  # pragma: no cover

    def layout(self, model) -> tuple[list[int], list[float] | None]:
        """(layers kept dense, relative per-layer ratios from the allocation file or None)."""
        num_layers = get_adapter(unwrap(model)).num_layers
        alloc = self.config.allocation
        ratios = None if alloc in ALLOCATIONS else load_layer_ratios(alloc, num_layers)
        return kept_dense(self.dense_layers(num_layers), ratios), ratios

    def plan_from(self, model, scores: dict[tuple[str, int], torch.Tensor], ratio: float | None = None) -> Plan:
        """The plan that removes `ratio` (default: the config's) of the blocks' parameters, lowest
        `scores` first, under this method's dense layers and allocation."""
        cfg = self.config
        m = unwrap(model)
        dense, ratios = self.layout(m)
        kinds = None if ratios is None else load_kind_ratios(cfg.allocation, len(ratios))
        plan = plan_structured(m, scores, ratio=cfg.ratio if ratio is None else ratio, allocation=cfg.allocation,
                               attn_unit=cfg.attn_unit, round_to=cfg.round_to, dense=dense, method=self.name,
                               config=cfg.to_dict(), layer_ratios=ratios, kind_ratios=kinds)
        if ratios is not None:
            plan.extra["layer_ratios"] = ratios  # as read, so the plan stands without the file
        if kinds is not None:
            from ..analysis.sensitivity import deviation_series

            plan.extra["kind_ratios"] = kinds
            kd = deviation_series(cfg.allocation)  # a `shearkit analyze` file: its trials go in the report
            if kd is not None:
                plan.extra["knowledge_distribution"] = kd
        return plan

    def run(self, model, ctx: MethodContext) -> Plan:
        dense, _ = self.layout(model)
        self.extra = {}
        layers = [i for i in range(get_adapter(unwrap(model)).num_layers) if i not in dense]
        plan = self.plan_from(model, self.score(model, ctx, layers))
        plan.extra.update(self.extra)
        return plan
