"""Table data for a structured plan (`shearkit plan show`, `shearkit prune --dry-run`)."""
from __future__ import annotations

from typing import Any

from ..plan import Plan
from .removal import normalize_entry

HEADERS = ["layer", "heads", "kv heads", "mlp width", "params removed", "% of layer"]


def plan_table(plan: Plan) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows): per layer kept/original heads, KV heads and MLP width, and parameters
    removed; a removed block shows as `removed`; the last row gives the totals and the ratio.

    Needs the records `finish_plan` stores in `plan.extra` (geometry, params_removed); plans
    without them fall back to `Plan.summary_rows`."""
    geo = plan.extra.get("geometry")
    per = plan.extra.get("params_removed")
    if not geo or per is None:
        return ["layer", "removed"], plan.summary_rows()
    rows: list[list[Any]] = []
    dense = set(plan.extra.get("dense_layers", []))
    for i, g in enumerate(geo):
        if i in set(plan.blocks):
            rows.append([i, "removed", "removed", "removed", per[i], "100.0"])
            continue
        e = normalize_entry(i, g, plan.layers.get(str(i), {}))
        frac = per[i] / _layer_total(g, per, i, plan) if per[i] else 0.0
        tag = " (dense)" if i in dense else ""
        rows.append([f"{i}{tag}", f"{g['heads'] - len(e['heads'])}/{g['heads']}",
                     f"{g['kv_heads'] - len(e['kv_groups'])}/{g['kv_heads']}",
                     f"{g['mlp'] - len(e['mlp_channels'])}/{g['mlp']}", per[i], f"{100 * frac:.1f}"])
    rows.append(["total", "", "", "", sum(per), f"{100 * plan.ratio_achieved:.2f} (target {100 * plan.ratio_target:.2f})"])
    return HEADERS, rows


def _layer_total(g: dict, per: list[int], i: int, plan: Plan) -> float:
    """Layer `i`'s parameter count before pruning."""
    lp = plan.extra.get("layer_params")
    if lp:
        return lp[i]
    return (plan.base.get("block_params") or 1) / (plan.base.get("num_layers") or len(per))


def plan_summary(plan: Plan) -> dict[str, Any]:
    """Headline numbers of a plan: method, target and achieved ratio, what is removed in total."""
    geo = plan.extra.get("geometry") or []
    heads = sum(len(normalize_entry(int(k), geo[int(k)], v)["heads"]) for k, v in plan.layers.items()) if geo else None
    chans = sum(len(v.get("mlp_channels", [])) for v in plan.layers.values())
    return {"method": plan.method, "kind": plan.kind, "ratio_target": plan.ratio_target,
            "ratio_achieved": plan.ratio_achieved, "params_removed": sum(plan.extra.get("params_removed") or []),
            "heads_removed": heads, "mlp_channels_removed": chans, "blocks_removed": list(plan.blocks),
            "hidden_channels_removed": len(plan.hidden_channels),
            "export": {"vanilla": "vanilla transformers", "per-layer": "per-layer widths (shearkit / trust_remote_code)",
                       "shared-blocks": "weight-shared blocks (shearkit / trust_remote_code)"}
            .get(plan.extra.get("export"), "unknown"),
            "base": plan.base.get("name"), "fingerprint": plan.base.get("fingerprint")}
