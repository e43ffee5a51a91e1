"""Structured plans from group scores: which heads / KV groups and MLP channels each layer loses.

Ratio: the fraction of the decoder blocks' base parameters removed (all weights and biases in
the blocks; embeddings, final norm and lm_head excluded). The planner removes *units* until the
removed fraction first reaches the target, so the achieved ratio is >= the target (by less than
one unit with `global` allocation, one unit per prunable layer with `uniform` or given layer
ratios), and reports it exactly (recounted from the tensors' shapes).

Units per prunable layer, lowest score first within the layer:
- MLP: chunks of channels, sized so the kept width stays a multiple of `round_to` (the first
  chunk absorbs `width % round_to`); at least `round_to` channels stay.
- Attention (`attn_unit`): `kv_group`: one KV head with its query heads (at least one KV group
  stays); `query_heads`: the k-th least important query head of every KV head at once, so each
  KV head keeps the same number of query heads (at least one each); without GQA a query head
  has its own KV head, so both modes remove whole heads; `none` leaves attention dense.

Allocation: `uniform` gives every prunable layer the same fraction p of its MLP width and of its
attention units (p searched for the smallest value reaching the target; the same widths in
every prunable layer); `global` takes units from any layer in order of score per parameter;
given per-layer ratios r_i give layer i the fraction min(1, c * r_i), one factor c for all (the
smallest reaching the target), so a layer with twice the ratio loses about twice the share; given
per-kind ratios (`kind_ratios`: `attn` and `mlp` lists) do the same per layer and kind, so a
layer's attention can stay dense while its MLP is pruned (knowledge-distribution allocations).
Layers in `dense` are never pruned (which ones is the method's choice: `methods/structured.py`);
dense layers make widths differ between layers. The planner knows no method: scores in, plan out.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..plan import Plan
from .groups import kv_groups, mlp_channels, query_heads
from .removal import layer_geometry, normalize_entry, ratio_removed, removal_map

ALLOCATIONS = ("uniform", "global")
ATTN_UNITS = ("kv_group", "query_heads", "none")


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


def kept_dense(dense: list[int], layer_ratios: list[float] | None = None) -> list[int]:
    """The layers a plan leaves dense: `dense` and those whose given ratio is 0."""
    zero = {i for i, r in enumerate(layer_ratios or []) if r == 0}
    return sorted(set(dense) | zero)


def plan_structured(model: nn.Module, scores: dict[tuple[str, int], torch.Tensor], *, ratio: float, allocation: str,
                    attn_unit: str, round_to: int, dense: list[int], method: str, config: dict,
                    layer_ratios: list[float] | None = None,
                    kind_ratios: dict[str, list[float]] | None = None) -> Plan:
    """A structured plan removing at least `ratio` of the blocks' parameters, lowest scores first.

    Args:
        scores: (kind, layer) -> one score per group, for kinds `mlp_channel`, `kv_group` and (with
            `attn_unit="query_heads"`) `query_head`, for every layer not in `dense`; higher means
            more important.
        allocation: `uniform` or `global` (see the module docstring); ignored when `layer_ratios`
            is given (then it names where the ratios came from, for messages).
        dense: layers never pruned. `config`: the method's options, recorded in the plan.
        layer_ratios: one relative ratio per layer: layer i loses the fraction min(1, c * r_i) of its
            units, one factor c for all found by bisection; layers with r_i = 0 stay dense.
        kind_ratios: {"attn": [...], "mlp": [...]}, one relative ratio per layer and kind, used as
            `layer_ratios` is but per structure (a 0 keeps that structure dense); needs `layer_ratios`.

    Raises:
        ShearkitError: the ratio cannot be reached under the constraints (the message gives the
            maximum reachable).
    """
    m = unwrap(model)
    geo = layer_geometry(m)
    L = len(geo)
    if attn_unit not in ATTN_UNITS:
        raise ShearkitError(f"attn_unit must be one of {', '.join(ATTN_UNITS)}, got '{attn_unit}'.")
    if layer_ratios is None and allocation not in ALLOCATIONS:
        raise ShearkitError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got '{allocation}'.")
    if layer_ratios is not None and len(layer_ratios) != L:
        raise ShearkitError(f"{allocation} gives {len(layer_ratios)} layer ratios; the model has {L} layers.")
    if kind_ratios is not None:
        if layer_ratios is None:
            raise ShearkitError("Per-kind ratios need per-layer ratios too (the allocation file's layer_ratios).")
        for k in ("attn", "mlp"):
            if len(kind_ratios.get(k) or []) != L:
                raise ShearkitError(f"{allocation} gives {len(kind_ratios.get(k) or [])} {k} ratios; the model has "
                                    f"{L} layers.")
        layer_ratios = [max(a, b) for a, b in zip(kind_ratios["attn"], kind_ratios["mlp"])]
    dense = kept_dense(dense, layer_ratios)
    prunable = [i for i in range(L) if i not in dense]
    before = sum(_layer_params(m))
    seqs: list[_Seq] = []
    for i in prunable:
        per_ch = int(mlp_channels(m, i).param_counts(m)[0])
        seqs.append(_mlp_seq(i, scores[("mlp_channel", i)].float().cpu(), per_ch, round_to))
        if attn_unit != "none":
            seqs.append(_attn_seq(m, i, geo[i], scores, attn_unit))
    weights = {(s.layer, _kind(s)): 1.0 for s in seqs}
    if kind_ratios is not None:
        weights = {(s.layer, _kind(s)): float(kind_ratios[_kind(s)][s.layer]) for s in seqs}
    elif layer_ratios is not None:
        weights = {(s.layer, _kind(s)): float(layer_ratios[s.layer]) for s in seqs}
    seqs = [s for s in seqs if weights[(s.layer, _kind(s))] > 0]  # a 0 keeps that structure dense
    target = ratio * before
    max_removed = sum(sum(s.costs) for s in seqs)
    if target > max_removed + 1e-6:
        raise ShearkitError(
            f"Ratio {ratio} is unreachable: with layers {dense or 'none'} kept dense, attn_unit="
            f"'{attn_unit}' and MLP widths kept at multiples of {round_to} (at least one head and "
            f"{round_to} channels per layer), at most {max_removed / before:.4f} of the decoder blocks' "
            "parameters can be removed. Lower the ratio, keep fewer layers dense, or prune attention too.")
    extra = {}
    if ratio > 0:
        if layer_ratios is not None:
            extra["layer_ratio_scale"] = _allocate_scaled(seqs, target, weights)
        elif allocation == "uniform":
            _allocate_scaled(seqs, target, weights)
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
    plan = Plan(method=method, kind="structured", ratio_target=ratio, base=Plan.describe_base(m),
                config=config, layers=entries)
    finish_plan(m, plan, dense=dense)
    plan.extra.update(extra)
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


def _kind(s: _Seq) -> str:
    """`mlp` or `attn`: the kind a per-kind ratio addresses."""
    return "mlp" if s.kind == "mlp" else "attn"


def _allocate_scaled(seqs: list[_Seq], target: float, weights: dict[tuple[int, str], float]) -> float:
    """Give structure (layer i, kind k) the fraction min(1, c * weights[i, k]) of its units, c the
    smallest factor (bisection) reaching `target`; all weights 1 is the uniform allocation. Returns c."""
    if not seqs:
        return 0.0
    top = 1.0 / min(weights[(s.layer, _kind(s))] for s in seqs)  # every fraction is 1 from here on

    def apply(c: float) -> int:
        for s in seqs:
            s.taken = _uniform_take(s, min(1.0, c * weights[(s.layer, _kind(s))]))
        return _removed(seqs)

    if apply(top) < target:  # rounding left units over; fall back to taking everything allowed
        for s in seqs:
            s.taken = len(s.units)
        return top
    lo, hi = 0.0, top
    for _ in range(50):
        mid = (lo + hi) / 2
        if apply(mid) >= target:
            hi = mid
        else:
            lo = mid
    apply(hi)
    return hi


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
