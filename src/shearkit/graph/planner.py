"""Structured plans from group scores: which heads / KV groups and MLP channels each layer loses.

Ratio: the fraction of the decoder blocks' base parameters removed (all weights and biases in
the blocks; embeddings, final norm and lm_head excluded). The planner removes *units* until the
removed fraction first reaches the target, so the achieved ratio is >= the target (by less than
one unit with `global` allocation, one unit per prunable layer with `uniform`), and reports it
exactly (recounted from the tensors' shapes).

Units per prunable layer, lowest score first within the layer:
- MLP: chunks of channels, sized so the kept width stays a multiple of `round_to` (the first
  chunk absorbs `width % round_to`); at least `round_to` channels stay.
- Attention (`attn_unit`): `kv_group`: one KV head with its query heads (at least one KV group
  stays); `query_heads`: the k-th least important query head of every KV head at once, so each
  KV head keeps the same number of query heads (at least one each); without GQA a query head
  has its own KV head, so both modes remove whole heads; `none` leaves attention dense.

Allocation: `uniform` gives every prunable layer the same fraction p of its MLP width and of its
attention units (p searched for the smallest value reaching the target; the same widths in
every prunable layer); `global` takes units from any layer in order of score per parameter.
Layers in `dense_first` / `dense_last` are never pruned (LLM-Pruner keeps the first 4 and last
2 of LLaMA-7B's 32 layers dense); dense layers make widths differ between layers.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShearkitError
from ..methods import PruneConfig
from ..plan import Plan
from .groups import kv_groups, mlp_channels, query_heads, unwrap
from .removal import layer_geometry, normalize_entry, ratio_removed, removal_map

ALLOCATIONS = ("uniform", "global")
ATTN_UNITS = ("kv_group", "query_heads", "none")


@dataclass
class StructuredConfig(PruneConfig):
    """Options shared by structured methods.

    allocation: `uniform` (same widths in every prunable layer; with no dense layers the saved
        model loads in vanilla transformers) or `global` (units ranked across layers).
    attn_unit: `kv_group` (removes KV heads with their query heads: smaller KV cache),
        `query_heads` (equal number of query heads per KV head) or `none`.
    dense_first / dense_last: layers at each end kept dense; None = LLM-Pruner's proportion
        (4 and 2 of 32 layers, rounded) for methods that follow it, else 0.
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
            raise ShearkitError(f"prune.allocation must be one of {', '.join(ALLOCATIONS)}, got '{self.allocation}'.")
        if self.attn_unit not in ATTN_UNITS:
            raise ShearkitError(f"prune.attn_unit must be one of {', '.join(ATTN_UNITS)}, got '{self.attn_unit}'.")
        if self.round_to < 1:
            raise ShearkitError(f"prune.round_to must be >= 1, got {self.round_to}.")
        for k in ("dense_first", "dense_last"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ShearkitError(f"prune.{k} must be >= 0, got {v}.")


def dense_layers(num_layers: int, first: int | None, last: int | None, llm_pruner_default: bool = False) -> list[int]:
    """Indices of layers kept dense."""
    if first is None:
        first = round(num_layers * 4 / 32) if llm_pruner_default else 0
    if last is None:
        last = round(num_layers * 2 / 32) if llm_pruner_default else 0
    keep = set(range(min(first, num_layers))) | set(range(max(num_layers - last, 0), num_layers))
    return sorted(keep)


@dataclass
class _Seq:
    """A layer's removable units of one kind, in removal order."""

    layer: int
    kind: str  # mlp | attn
    units: list[list[int]]  # indices (channels / KV heads / query heads) removed by each unit
    costs: list[int]
    scores: list[float]
    full: int = 0  # units count of the whole structure (for the uniform fraction)
    taken: int = 0


def _mlp_seq(layer: int, scores: torch.Tensor, per_channel: int, round_to: int) -> _Seq:
    width = scores.numel()
    order = torch.argsort(scores, stable=True).tolist()
    units, costs, sc = [], [], []
    pos, kept = 0, width
    while True:
        nxt = ((kept - 1) // round_to) * round_to  # next allowed kept width below `kept`
        if nxt < round_to:
            break
        chunk = order[pos:pos + (kept - nxt)]
        units.append(sorted(chunk))
        costs.append(len(chunk) * per_channel)
        sc.append(float(scores[chunk].sum()))
        pos += len(chunk)
        kept = nxt
    return _Seq(layer, "mlp", units, costs, sc, full=width)


def _attn_seq(model, layer: int, geo: dict, scores: dict, unit: str) -> _Seq:
    nh, nkv = geo["heads"], geo["kv_heads"]
    g = nh // nkv
    if unit == "query_heads" and g > 1:
        qs = scores[("query_head", layer)].view(nkv, g)
        order = torch.argsort(qs, dim=1, stable=True)
        cost = int(query_heads(model, layer).param_counts(model)[0]) * nkv
        units, sc = [], []
        for u in range(g - 1):
            heads = sorted(int(kv * g + order[kv, u]) for kv in range(nkv))
            units.append(heads)
            sc.append(float(sum(qs[kv, order[kv, u]] for kv in range(nkv))))
        return _Seq(layer, "qheads", units, [cost] * len(units), sc, full=g)
    ks = scores[("kv_group", layer)]
    order = torch.argsort(ks, stable=True).tolist()[: nkv - 1]
    cost = int(kv_groups(model, layer).param_counts(model)[0])
    return _Seq(layer, "kv", [[i] for i in order], [cost] * len(order), [float(ks[i]) for i in order], full=nkv)


def _uniform_take(seq: _Seq, p: float) -> int:
    """Units of `seq` a fraction p of the structure corresponds to (nearest, ties down)."""
    if seq.kind == "mlp":
        best, best_err, removed = 0, p * seq.full, 0
        for n, u in enumerate(seq.units, start=1):
            removed += len(u)
            err = abs(removed - p * seq.full)
            if err < best_err - 1e-9:
                best, best_err = n, err
        return best
    want = p * seq.full
    n = int(want) + (1 if want - int(want) > 0.5 + 1e-9 else 0)
    return min(n, len(seq.units))


def plan_structured(model: nn.Module, scores: dict[tuple[str, int], torch.Tensor], cfg: StructuredConfig, *,
                    method: str, llm_pruner_dense: bool = False) -> Plan:
    """A structured plan removing at least `cfg.ratio` of the blocks' parameters, lowest scores first.

    Args:
        scores: (kind, layer) -> one score per group, for kinds `mlp_channel`, `kv_group` and (with
            `attn_unit="query_heads"`) `query_head`; higher means more important.
        llm_pruner_dense: resolve `dense_first/last=None` to LLM-Pruner's proportions.

    Raises:
        ShearkitError: the ratio cannot be reached under the constraints (the message gives the
            maximum reachable).
    """
    m = unwrap(model)
    geo = layer_geometry(m)
    L = len(geo)
    dense = dense_layers(L, cfg.dense_first, cfg.dense_last, llm_pruner_dense)
    prunable = [i for i in range(L) if i not in dense]
    before = sum(_layer_params(m))
    seqs: list[_Seq] = []
    for i in prunable:
        per_ch = int(mlp_channels(m, i).param_counts(m)[0])
        seqs.append(_mlp_seq(i, scores[("mlp_channel", i)].float().cpu(), per_ch, cfg.round_to))
        if cfg.attn_unit != "none":
            seqs.append(_attn_seq(m, i, geo[i], scores, cfg.attn_unit))
    target = cfg.ratio * before
    max_removed = sum(sum(s.costs) for s in seqs)
    if target > max_removed + 1e-6:
        raise ShearkitError(
            f"Ratio {cfg.ratio} is unreachable: with layers {dense or 'none'} kept dense, attn_unit="
            f"'{cfg.attn_unit}' and MLP widths kept at multiples of {cfg.round_to} (at least one head and "
            f"{cfg.round_to} channels per layer), at most {max_removed / before:.4f} of the decoder blocks' "
            "parameters can be removed. Lower the ratio, keep fewer layers dense, or prune attention too.")
    if cfg.ratio > 0:
        if cfg.allocation == "uniform":
            _allocate_uniform(seqs, target)
        else:
            _allocate_global(seqs, target)
    entries: dict[str, dict[str, list[int]]] = {}
    for s in seqs:
        if not s.taken:
            continue
        e = entries.setdefault(str(s.layer), {"heads": [], "kv_groups": [], "mlp_channels": []})
        key = {"mlp": "mlp_channels", "kv": "kv_groups", "qheads": "heads"}[s.kind]
        e[key] = sorted(i for u in s.units[: s.taken] for i in u)
    entries = {k: normalize_entry(int(k), geo[int(k)], e) for k, e in entries.items()}
    plan = Plan(method=method, kind="structured", ratio_target=cfg.ratio, base=Plan.describe_base(m),
                config=cfg.to_dict(), layers=entries)
    finish_plan(m, plan, dense=dense)
    return plan


def finish_plan(model: nn.Module, plan: Plan, dense: list[int] | None = None) -> Plan:
    """Fill `ratio_achieved` and the per-layer records a table needs (exact recount)."""
    m = unwrap(model)
    geo = layer_geometry(m)
    rem = removal_map(m, plan)
    ratio, per_layer = ratio_removed(m, rem, plan.blocks)
    plan.ratio_achieved = ratio
    after = []
    for i, gm in enumerate(geo):
        e = normalize_entry(i, gm, plan.layers.get(str(i), {}))
        after.append((gm["heads"] - len(e["heads"]), gm["kv_heads"] - len(e["kv_groups"]), gm["mlp"] - len(e["mlp_channels"])))
    from ..arch import get_adapter

    kept_after = [a for i, a in enumerate(after) if i not in set(plan.blocks)]
    uniform = len(set(kept_after)) <= 1
    heads_cut = any(a[0] != g["heads"] for a, g in zip(after, geo))
    # GPT-2 and OPT derive head_dim from hidden/heads: any head pruning needs the per-layer export
    vanilla = uniform and (get_adapter(m).family == "llama" or not heads_cut)
    plan.extra.update({"geometry": geo, "layer_params": _layer_params(m), "params_removed": per_layer,
                       "dense_layers": dense or [], "uniform_widths": uniform,
                       "export": "vanilla" if vanilla else "per-layer"})
    return plan


def _layer_params(m) -> list[int]:
    from .removal import layer_params_after

    return layer_params_after(m)


def _removed(seqs: list[_Seq]) -> int:
    return sum(sum(s.costs[: s.taken]) for s in seqs)


def _allocate_uniform(seqs: list[_Seq], target: float) -> None:
    def apply(p: float) -> int:
        for s in seqs:
            s.taken = _uniform_take(s, p)
        return _removed(seqs)

    if apply(1.0) < target:  # rounding left units over; fall back to taking everything allowed
        for s in seqs:
            s.taken = len(s.units)
        return
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if apply(mid) >= target:
            hi = mid
        else:
            lo = mid
    apply(hi)


def _allocate_global(seqs: list[_Seq], target: float) -> None:
    heap = []
    for k, s in enumerate(seqs):
        if s.units:
            heapq.heappush(heap, (s.scores[0] / max(s.costs[0], 1), k))
    removed = 0
    while removed < target and heap:
        _, k = heapq.heappop(heap)
        s = seqs[k]
        removed += s.costs[s.taken]
        s.taken += 1
        if s.taken < len(s.units):
            heapq.heappush(heap, (s.scores[s.taken] / max(s.costs[s.taken], 1), k))
