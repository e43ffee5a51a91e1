"""From a structured plan to the exact rows and columns it removes, checked against the model.

A plan's layer entry lists removed query heads (`heads`), removed KV heads (`kv_groups`) and
removed MLP channels (`mlp_channels`) in the layer's own numbering. Removing a KV group removes
its query heads; removing every query head of a KV group removes the group. What is left must
keep the same number of query heads on every KV head (transformers maps query head h to KV head
h // group_size) and at least one head and one MLP channel per layer (remove whole blocks with
`blocks`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ..arch.modules import module_shape, unwrap
from ..errors import ShearkitError
from .groups import GroupSet, hidden_channels, kv_groups, mlp_channels, query_heads

Removal = dict[tuple[str, int], set[int]]  # (module, dim) -> removed indices


def layer_geometry(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: heads, kv_heads, head_dim and mlp width, read from the weights."""
    from ..arch import get_adapter

    out = []
    for b in get_adapter(unwrap(model)).blocks():
        a = b.attn
        out.append({"heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim, "mlp": b.mlp.width})
    return out


def normalize_entry(layer: int, geo: dict[str, int], entry: dict[str, Any]) -> dict[str, list[int]]:
    """Validate one layer entry and close it: removed KV groups take their query heads along, and a
    KV group whose query heads are all removed is removed. Raises ShearkitError on a bad entry."""
    unknown_keys = set(entry) - {"heads", "kv_groups", "mlp_channels"}
    if unknown_keys:
        raise ShearkitError(f"Plan layer {layer} has unknown entries {sorted(unknown_keys)}; "
                            "structured plans use heads, kv_groups and mlp_channels.")
    nh, nkv, width = geo["heads"], geo["kv_heads"], geo["mlp"]
    g = nh // nkv
    heads = _indices(entry.get("heads", []), nh, f"layer {layer} heads")
    kvs = _indices(entry.get("kv_groups", []), nkv, f"layer {layer} kv_groups")
    mlp = _indices(entry.get("mlp_channels", []), width, f"layer {layer} mlp_channels")
    for kv in list(kvs):
        heads |= set(range(kv * g, (kv + 1) * g))
    for kv in range(nkv):
        if all(h in heads for h in range(kv * g, (kv + 1) * g)):
            kvs.add(kv)
    kept = [sum(1 for h in range(kv * g, (kv + 1) * g) if h not in heads) for kv in range(nkv) if kv not in kvs]
    if not kept:
        raise ShearkitError(f"Plan removes every attention head of layer {layer}; keep at least one KV group "
                            "(remove the whole block with `blocks` instead).")
    if len(set(kept)) > 1:
        raise ShearkitError(f"Plan keeps unequal numbers of query heads per KV head in layer {layer} ({kept}); "
                            "under GQA every KV head must keep the same number of query heads.")
    if len(mlp) >= width:
        raise ShearkitError(f"Plan removes every MLP channel of layer {layer}; keep at least one "
                            "(remove the whole block with `blocks` instead).")
    return {"heads": sorted(heads), "kv_groups": sorted(kvs), "mlp_channels": sorted(mlp)}


def _indices(values, n: int, what: str) -> set[int]:
    out = set()
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
            raise ShearkitError(f"Plan {what}: index {v!r} is out of range for this model (0..{n - 1}); "
                                "the plan was made for a model of other widths.")
        out.add(v)
    return out


def _add(rem: Removal, gs: GroupSet, rows: list[int]) -> None:
    if not rows:
        return
    sel = torch.tensor(rows, dtype=torch.long)
    for p in gs.parts:
        rem[(p.module, p.dim)].update(p.index[sel].reshape(-1).tolist())


def removal_map(model: nn.Module, plan) -> Removal:
    """Every (module, dim) -> removed indices that `plan` implies on `model` (LoRA factors included)."""
    geo = layer_geometry(model)
    if plan.base.get("num_layers") not in (None, len(geo)):
        raise ShearkitError(f"The plan is for a model with {plan.base['num_layers']} layers; this one has {len(geo)}.")
    rem: Removal = defaultdict(set)
    for key, entry in plan.layers.items():
        i = int(key)
        if not 0 <= i < len(geo):
            raise ShearkitError(f"Plan names layer {i}, but the model has {len(geo)} layers.")
        e = normalize_entry(i, geo[i], entry)
        nh, nkv = geo[i]["heads"], geo[i]["kv_heads"]
        g = nh // nkv
        _add(rem, kv_groups(model, i), e["kv_groups"])
        lone = [h for h in e["heads"] if h // g not in e["kv_groups"]]
        _add(rem, query_heads(model, i), lone)
        _add(rem, mlp_channels(model, i), e["mlp_channels"])
    if plan.hidden_channels:
        hs = hidden_channels(model)
        rows = sorted(_indices(plan.hidden_channels, hs.size, "hidden_channels"))
        heads = getattr(unwrap(model).config, "num_attention_heads", 1) or 1
        if len(rows) >= hs.size or (hs.size - len(rows)) % heads:
            raise ShearkitError(f"Plan keeps {hs.size - len(rows)} of {hs.size} hidden channels; transformers needs "
                                f"the hidden size to stay a positive multiple of num_attention_heads ({heads}).")
        _add(rem, hs, rows)
    nl = len(geo)
    bl = _indices(plan.blocks, nl, "blocks")
    if len(bl) >= nl:
        raise ShearkitError("Plan removes every block; keep at least one.")
    return rem


def layer_params_after(model: nn.Module, rem: Removal | None = None) -> list[int]:
    """Base parameters of each decoder block after removing `rem` (LoRA factors excluded)."""
    from ..arch import get_adapter

    m = unwrap(model)
    ad = get_adapter(m)
    rem = rem or {}
    out = []
    for i, block in enumerate(ad.layers):
        prefix = f"{ad.layers_path}.{i}."
        total = 0
        for sub_name, mod in block.named_modules():
            direct = list(mod.named_parameters(recurse=False))
            if "lora_" in sub_name or not direct:
                continue
            name = prefix + sub_name
            r0, r1 = len(rem.get((name, 0), ())), len(rem.get((name, 1), ()))
            w = getattr(mod, "weight", None)
            out_f, in_f = module_shape(mod) if isinstance(w, torch.Tensor) else (-1, -1)
            for pname, p in direct:
                if pname == "weight" and p.dim() == 2:
                    total += (out_f - r0) * (in_f - r1)
                elif p.dim() == 1 and p.shape[0] == out_f:
                    total += out_f - r0  # a bias, or a norm's weight
                else:
                    total += p.numel()
        out.append(total)
    return out


def ratio_removed(model: nn.Module, rem: Removal, removed_blocks=()) -> tuple[float, list[int]]:
    """(fraction of the blocks' base parameters removed, parameters removed per layer)."""
    before = layer_params_after(model)
    after = layer_params_after(model, rem)
    gone = set(removed_blocks)
    per = [b if i in gone else b - a for i, (b, a) in enumerate(zip(before, after))]
    return sum(per) / sum(before), per
