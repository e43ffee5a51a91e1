"""Numbers a report shows, computed from run data: per-layer plan summaries and metric comparisons.

Pure Python (no torch, no matplotlib), so tables and plots read the same figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .rundir import RunData

LOWER_IS_BETTER = ("ppl", "nll", "loss")


@dataclass
class LayerRow:
    """One layer of a structured plan: base and kept widths (kept is None where the base is unknown)."""

    layer: int
    status: str  # kept | removed | replaced by N
    heads_removed: int
    kv_removed: int
    mlp_removed: int
    heads: int | None = None
    kv_heads: int | None = None
    mlp: int | None = None
    heads_kept: int | None = None
    kv_kept: int | None = None
    mlp_kept: int | None = None


def structured_layers(plan: dict[str, Any]) -> list[LayerRow]:
    """Per-layer removed and (when `plan.base.geometry` gives the base widths) kept heads, KV heads and
    MLP channels. Removing a KV group removes its query heads, as surgery does."""
    base = plan.get("base") or {}
    geo = base.get("geometry") or []
    n = base.get("num_layers") or len(geo) or (max((int(k) for k in plan.get("layers", {})), default=-1) + 1)
    blocks = set(plan.get("blocks") or [])
    replaced = {int(k): v for k, v in (plan.get("replaced") or {}).items()}
    rows = []
    for i in range(n):
        e = (plan.get("layers") or {}).get(str(i), {})
        g = geo[i] if i < len(geo) else None
        heads = set(e.get("heads", []))
        kvs = set(e.get("kv_groups", []))
        mlp = len(e.get("mlp_channels", []))
        status = "removed" if i in blocks else (f"replaced by {replaced[i]}" if i in replaced else "kept")
        row = LayerRow(i, status, len(heads), len(kvs), mlp)
        if g:
            gs = max(1, g["heads"] // max(1, g["kv_heads"]))
            heads |= {h for kv in kvs for h in range(kv * gs, (kv + 1) * gs)}
            kvs |= {kv for kv in range(g["kv_heads"]) if all(h in heads for h in range(kv * gs, (kv + 1) * gs))}
            row.heads_removed, row.kv_removed = len(heads), len(kvs)
            row.heads, row.kv_heads, row.mlp = g["heads"], g["kv_heads"], g["mlp"]
            gone = i in blocks
            row.heads_kept = 0 if gone else g["heads"] - len(heads)
            row.kv_kept = 0 if gone else g["kv_heads"] - len(kvs)
            row.mlp_kept = 0 if gone else g["mlp"] - mlp
        rows.append(row)
    return rows


def unstructured_layers(plan: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Module names and rows `[layer, pattern, sparsity of each module...]` of an unstructured plan."""
    layers = plan.get("layers") or {}
    modules: list[str] = []
    for e in layers.values():
        for m in (e.get("sparsity") or {}):
            if m not in modules:
                modules.append(m)
    rows = []
    for k in sorted(layers, key=int):
        sp = layers[k].get("sparsity") or {}
        rows.append([int(k), layers[k].get("pattern") or "", *[sp.get(m) for m in modules]])
    return modules, rows


def is_lower_better(metric: str) -> bool:
    return any(metric.startswith(p) for p in LOWER_IS_BETTER)


def task_metrics(rec: dict[str, Any]) -> dict[str, float]:
    """Metric -> value of one task record (zero-shot records carry several, perplexity one)."""
    if isinstance(rec.get("metrics"), dict) and rec["metrics"]:
        return {k: float(v) for k, v in rec["metrics"].items() if isinstance(v, (int, float))}
    if isinstance(rec.get("value"), (int, float)):
        return {rec.get("metric") or "value": float(rec["value"])}
    return {}


@dataclass
class Comparison:
    """A metrics table: one column per model, one row per (task, metric)."""

    columns: list[str]  # model labels: "dense" (if measured), the run, then the --vs runs
    rows: list[tuple[str, str, list[float | None]]]  # task, metric, one value per column
    main: dict[str, str]  # task -> its main metric

    def delta(self, row: tuple[str, str, list[float | None]], col: int, ref: int = 0) -> float | None:
        v, r = row[2][col], row[2][ref]
        return None if v is None or r is None else v - r


def compare(run: RunData, others: list[RunData]) -> Comparison:
    """Metrics of the dense model (when the run measured it), the run, and other runs, aligned by task."""
    cols: list[tuple[str, dict[str, dict]]] = []
    if run.dense_tasks:
        cols.append(("dense", run.dense_tasks))
    cols.append((run.label, run.tasks))
    for o in others:
        cols.append((o.label, o.tasks))
    labels = _unique([c[0] for c in cols])
    order: list[tuple[str, str]] = []
    main: dict[str, str] = {}
    for _, tasks in cols:
        for t, rec in tasks.items():
            if not isinstance(rec, dict):
                continue
            main.setdefault(t, rec.get("metric") or next(iter(task_metrics(rec)), "value"))
            for m in task_metrics(rec):
                if (t, m) not in order:
                    order.append((t, m))
    rows = []
    for t, m in order:
        rows.append((t, m, [task_metrics(tasks.get(t) or {}).get(m) for _, tasks in cols]))
    acc_tasks = [t for t, m in main.items() if not is_lower_better(m)]
    if len(acc_tasks) >= 2:  # the papers' "Average" column: mean of each task's main metric
        vals = []
        for _, tasks in cols:
            xs = [task_metrics(tasks.get(t) or {}).get(main[t]) for t in acc_tasks]
            vals.append(sum(xs) / len(xs) if all(x is not None for x in xs) else None)
        rows.append(("mean (zero-shot)", "main metric", vals))
    return Comparison(labels, rows, main)


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        if lab in seen:
            seen[lab] += 1
            out.append(f"{lab} ({seen[lab]})")
        else:
            seen[lab] = 1
            out.append(lab)
    return out


def numeric_series(extra: dict[str, Any]) -> list[tuple[str, dict[str, list[float]]]]:
    """Plottable entries of a plan's `extra`: a list of numbers (one per layer or step), a dict of such
    lists (several series), or a dict of number by layer. Anything else is left out of plots."""
    out = []
    for key, v in (extra or {}).items():
        series: dict[str, list[float]] = {}
        if _numbers(v):
            series[key] = [float(x) for x in v]
        elif isinstance(v, dict) and v and all(_numbers(x) for x in v.values()):
            series = {str(k): [float(x) for x in xs] for k, xs in v.items()}
        elif isinstance(v, dict) and v and all(_num(x) for x in v.values()) and all(_intlike(k) for k in v):
            keys = sorted(v, key=lambda k: int(k))
            if [int(k) for k in keys] == list(range(int(keys[0]), int(keys[0]) + len(keys))):
                series[key] = [float(v[k]) for k in keys]
        if series:
            out.append((key, series))
    return out


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numbers(v) -> bool:
    return isinstance(v, list) and len(v) >= 2 and all(_num(x) for x in v)


def _intlike(k) -> bool:
    try:
        int(k)
        return True
    except (TypeError, ValueError):
        return False
