"""Numbers a report shows, computed from run data: per-layer plan summaries and metric comparisons.

Pure Python (no torch, no matplotlib), so tables and plots read the same figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
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
    dense: bool = False  # the method kept this layer unpruned on purpose (e.g. LLM-Pruner's first/last layers)
    params: int | None = None  # the layer's parameters before pruning (when the plan records them)
    params_removed: int | None = None

    def kept_fractions(self) -> dict[str, float | None]:
        """Fraction of query heads, KV heads, MLP channels and parameters kept (None where unknown)."""
        def frac(kept, base):
            return None if kept is None or not base else kept / base

        params_kept = None
        if self.params and self.params_removed is not None:
            params_kept = 0.0 if self.status == "removed" else 1 - self.params_removed / self.params
        return {"query heads": frac(self.heads_kept, self.heads), "KV heads": frac(self.kv_kept, self.kv_heads),
                "MLP channels": frac(self.mlp_kept, self.mlp), "parameters": params_kept}


def structured_layers(plan: dict[str, Any]) -> list[LayerRow]:
    """Per-layer removed and (when `plan.base.geometry` gives the base widths) kept heads, KV heads and
    MLP channels. Removing a KV group removes its query heads, as surgery does."""
    base = plan.get("base") or {}
    geo = base.get("geometry") or []
    n = base.get("num_layers") or len(geo) or (max((int(k) for k in plan.get("layers", {})), default=-1) + 1)
    blocks = set(plan.get("blocks") or [])
    replaced = {int(k): v for k, v in (plan.get("replaced") or {}).items()}
    extra = plan.get("extra") or {}
    dense = {int(i) for i in extra.get("dense_layers") or []}
    layer_params, removed = extra.get("layer_params") or [], extra.get("params_removed") or []
    rows = []
    for i in range(n):
        e = (plan.get("layers") or {}).get(str(i), {})
        g = geo[i] if i < len(geo) else None
        heads = set(e.get("heads", []))
        kvs = set(e.get("kv_groups", []))
        mlp = len(e.get("mlp_channels", []))
        status = "removed" if i in blocks else (f"replaced by {replaced[i]}" if i in replaced else
                                                  "dense (not pruned)" if i in dense else "kept")
        row = LayerRow(i, status, len(heads), len(kvs), mlp, dense=i in dense)
        if i < len(layer_params) and i < len(removed):
            row.params, row.params_removed = int(layer_params[i]), int(removed[i])
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
        return {k: float(v) for k, v in rec["metrics"].items() if _num(v)}
    if _num(rec.get("value")):
        return {rec.get("metric") or "value": float(rec["value"])}
    if _num(rec.get("ppl")):  # e.g. the perplexities `shearkit recover` measured during training
        return {"ppl": float(rec["ppl"])}
    return {}


PRUNED_STAGE = "pruned, before recovery"
RUN_KEYS = ("tasks", "dense", "pruned", "prune", "recover", "model", "params")


def final_stage(metrics: dict[str, Any]) -> str:
    """What the final model of a run is: recovered, pruned, or (an evaluation run) measured."""
    return "recovered" if metrics.get("recover") else "pruned" if metrics.get("prune") else "measured"


def run_stages(metrics: dict[str, Any]) -> list[tuple[str, dict[str, dict]]]:
    """(stage, task -> record) of a run's metrics.json in pipeline order: `dense`, `pruned, before
    recovery`, then the final model (`final_stage`). A plain task -> record mapping (what
    `shearkit.save(metrics=...)` accepts) is one stage, `measured`."""
    if any(k in metrics for k in RUN_KEYS):
        out = [(name, (metrics.get(key) or {}).get("tasks") or {}) for key, name in
               (("dense", "dense"), ("pruned", PRUNED_STAGE))]
        out.append((final_stage(metrics), metrics.get("tasks") or {}))
    else:
        out = [("measured", {t: r if isinstance(r, dict) else {"value": r} for t, r in metrics.items()
                             if isinstance(r, dict) or _num(r)})]
    return [(name, tasks) for name, tasks in out if isinstance(tasks, dict) and tasks]


@dataclass
class Comparison:
    """A metrics table: one column per model, one row per (task, metric)."""

    columns: list[str]  # model labels: "dense", "pruned, before recovery" (if measured), the run, the --vs runs
    rows: list[tuple[str, str, list[float | None]]]  # task, metric, one value per column
    main: dict[str, str]  # task -> its main metric
    tasks: list[dict[str, dict]] = field(default_factory=list)  # each column's task -> record
    stage: dict[str, int] = field(default_factory=dict)  # "dense" / "pruned" / "final" -> column of the run

    def delta(self, row: tuple[str, str, list[float | None]], col: int, ref: int = 0) -> float | None:
        v, r = row[2][col], row[2][ref]
        return None if v is None or r is None else v - r


def align(cols: list[tuple[str, dict[str, dict]]]) -> Comparison:
    """Line up the task records of several models (label, task -> record) by task and metric, and add
    the papers' zero-shot mean when two or more accuracy tasks were measured."""
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
    return Comparison(labels, rows, main, [tasks for _, tasks in cols])


def compare(run: RunData, others: list[RunData]) -> Comparison:
    """Metrics of each stage of the run (dense, pruned before recovery, final) and of other runs'
    final models, aligned by task. The run's final column is named after the run (and its stage)."""
    stages = run_stages(run.metrics)
    cols: list[tuple[str, dict[str, dict]]] = []
    where: dict[str, int] = {}
    for name, tasks in stages:
        if name == "dense":
            where["dense"] = len(cols)
        elif name == PRUNED_STAGE:
            where["pruned"] = len(cols)
        else:
            where["final"] = len(cols)
            name = run.label if len(stages) == 1 else f"{run.label} ({name})"
        cols.append((name, tasks))
    for o in others:
        cols.append((o.label, o.tasks))
    cmp = align(cols)
    cmp.stage = where
    return cmp


@dataclass
class Panel:
    """One panel of the metrics figure: each series' main metric per task."""

    lower_is_better: bool
    tasks: list[str]
    series: list[tuple[str, list[float | None]]]  # column label, one value per task


def metric_panels(cmp: Comparison) -> list[Panel]:
    """What the metrics figure draws: accuracies and perplexities in separate panels, one bar per
    column (dense, pruned before recovery, recovered, other runs) for each task's main metric."""
    lookup = {(t, m): vals for t, m, vals in cmp.rows}
    panels = []
    for lower in (False, True):
        tasks = [t for t, m in cmp.main.items() if is_lower_better(m) == lower and (t, m) in lookup]
        if tasks:
            series = [(col, [lookup[(t, cmp.main[t])][j] for t in tasks]) for j, col in enumerate(cmp.columns)]
            panels.append(Panel(lower, tasks, [(c, v) for c, v in series if any(x is not None for x in v)]))
    return panels


def measured_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """A model card's "Measured" table from a run's metrics (or task -> record): one row per task
    and metric, one column per stage measured (dense, pruned before recovery, final)."""
    stages = run_stages(metrics)
    if not stages:
        return [], []
    name, final = stages[-1]
    if name not in ("dense", PRUNED_STAGE):
        stages[-1] = ("this model" if name == "measured" else f"{name} (this model)", final)
    cmp = align(stages)
    rows = []
    for t, m, vals in cmp.rows:
        rec = next((ts[t] for ts in cmp.tasks if isinstance(ts.get(t), dict)), {})
        where = f" (seqlen {rec['seqlen']})" if rec.get("seqlen") else ""
        rows.append([t, m + where, *vals])
    return ["task", "metric", *cmp.columns], rows


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


# `plan.extra` records of the structured planner that the Plan section already shows per layer
PLAN_RECORDS = ("geometry", "layer_params", "params_removed", "dense_layers", "uniform_widths", "export")


def flat_value(data: dict[str, list[float | None]]) -> float | None:
    """The one value every point of every series shares (a figure of it would say nothing), else None."""
    values = {x if x is None else round(x, 6) for xs in data.values() for x in xs}
    return values.pop() if len(values) == 1 else None


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
