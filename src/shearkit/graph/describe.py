"""What a model's minimally removable structures are, as a table (`shearkit graph`).

One row per group set: its layer (`all` for the network-wide hidden channels), its kind, how many
groups it holds, the parameters of one group (base weights and biases) and of all of them, and
the LoRA factor entries that ride with them. LoRA entries are counted from the adapters the
model carries, or, with `lora_rank`, for adapters of that rank on every block projection (the
recovery default) that the model does not carry yet: r per B row and r per A column.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..arch.modules import is_lora_layer, unwrap
from ..errors import ShearkitError
from .groups import GroupSet, hidden_channels, kv_groups, mlp_channels, query_heads

HEADERS = ["layer", "kind", "groups", "params / group", "LoRA / group", "params", "LoRA params"]
KIND_LABELS = {"kv_group": "KV groups (KV head + its query heads)", "query_head": "query heads",
               "mlp_channel": "MLP channels", "hidden_channel": "hidden channels"}


def _carries_lora(model: nn.Module) -> bool:
    return any(is_lora_layer(m) for m in unwrap(model).modules())


def _lora_per_group(model: nn.Module, gs: GroupSet, rank: int | None, targets: set[str]) -> list[int]:
    """LoRA entries of each group: counted from the model's adapters, or for rank-`rank` adapters
    on `targets` (module paths) when the model carries none."""
    if rank is None:
        return gs.param_counts(model, lora=True).tolist()
    per = [0] * gs.size
    for p in gs.base_parts():
        if p.module in targets:
            k = p.index.shape[1]
            per = [x + k * rank for x in per]
    return per


def describe_groups(model: nn.Module, *, lora_rank: int | None = None, hidden: bool = False,
                    attn_unit: str = "kv_group") -> list[dict[str, Any]]:
    """One record per group set: layer, kind, groups, params_per_group, lora_per_group, params,
    lora_params (sums over the set's groups).

    Args:
        lora_rank: count LoRA entries for adapters of this rank on every block projection; only for a
            model without adapters (a model with adapters is counted as it is).
        hidden: add the network-wide hidden-channel group set (llama family).
        attn_unit: `kv_group` lists KV groups, `query_heads` lists query heads too (under GQA).
    """
    m = unwrap(model)
    if lora_rank is not None:
        if lora_rank < 1:
            raise ShearkitError(f"--lora-rank must be a positive rank, got {lora_rank}.")
        if _carries_lora(m):
            raise ShearkitError("The model already carries LoRA adapters, which are counted as they are; "
                                "leave out --lora-rank.")
    from ..arch import get_adapter
    from ..recovery.lora import default_targets, matched_modules

    targets = set(matched_modules(m, default_targets(m))) if lora_rank is not None else set()
    ad = get_adapter(m)
    sets: list[GroupSet] = []
    for i in range(ad.num_layers):
        sets.append(kv_groups(m, i))
        a = ad.block_view(i).attn
        if attn_unit == "query_heads" and a.group_size > 1:
            sets.append(query_heads(m, i))
        sets.append(mlp_channels(m, i))
    if hidden:
        sets.append(hidden_channels(m))
    rows = []
    for gs in sets:
        base = gs.param_counts(m).tolist()
        lora = _lora_per_group(m, gs, lora_rank, targets)
        rows.append({"layer": "all" if gs.layer is None else gs.layer, "kind": gs.kind, "groups": gs.size,
                     "params_per_group": base[0] if len(set(base)) == 1 else base,
                     "lora_per_group": lora[0] if len(set(lora)) == 1 else lora,
                     "params": sum(base), "lora_params": sum(lora)})
    return rows


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """`describe_groups` records as rows under `HEADERS`."""
    return [[r["layer"], r["kind"], r["groups"], r["params_per_group"], r["lora_per_group"], r["params"],
             r["lora_params"]] for r in records]


def plot_groups(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Bars of the parameters each layer's group sets hold, one colour per kind (LoRA entries
    hatched on top when counted); the hidden-channel set spans the network and is named in the title."""
    from ..io.atomic import atomic_file
    from ..report.plots import _figure, _integer_x

    per_layer = [r for r in records if r["layer"] != "all"]
    if not per_layer:
        raise ShearkitError("No per-layer groups to plot: the model has no decoder blocks; leave out --plot.")
    kinds = list(dict.fromkeys(r["kind"] for r in per_layer))
    layers = sorted({r["layer"] for r in per_layer})
    fig = _figure(min(14.0, max(8.0, 0.3 * len(layers) + 4)), 3.8)
    ax = fig.subplots()
    w = 0.8 / len(kinds)
    colors = {"kv_group": "#4c72b0", "query_head": "#8172b3", "mlp_channel": "#55a868"}
    for j, kind in enumerate(kinds):
        by = {r["layer"]: r for r in per_layer if r["kind"] == kind}
        xs = [i + (j - (len(kinds) - 1) / 2) * w for i in layers]
        base = [by[i]["params"] if i in by else 0 for i in layers]
        ax.bar(xs, base, w, color=colors.get(kind, "#937860"), label=KIND_LABELS.get(kind, kind))
        lora = [by[i]["lora_params"] if i in by else 0 for i in layers]
        if any(lora):
            ax.bar(xs, lora, w, bottom=base, color="white", edgecolor=colors.get(kind, "#937860"), hatch="///",
                   label=f"LoRA of {KIND_LABELS.get(kind, kind)}")
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters")
    _integer_x(ax)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    hid = [r for r in records if r["layer"] == "all"]
    note = f"; hidden channels (whole network): {hid[0]['groups']} groups, {hid[0]['params']:,} params" if hid else ""
    ax.set_title((title or "parameters in each layer's removable structures") + note, fontsize=10)
    out = Path(path)
    with atomic_file(out) as tmp:
        fig.savefig(tmp)  # the format follows the file's suffix (png, svg, pdf)
    return out
