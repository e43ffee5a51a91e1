"""Assemble a report document from a run (and runs to compare with)."""
from __future__ import annotations

import time
from typing import Any

from .._version import __version__
from . import plots
from .render import Code, Document, Figure, Section, Table, Text, fmt
from .rundir import TRAIN_LOG, RunData
from .summary import (PLAN_RECORDS, Comparison, compare, flat_value, metric_panels, numeric_series,
                      structured_layers, unstructured_layers)

RECOVERY_FILES = {"log": "training log", "plot": "loss plot", "adapter_dir": "LoRA adapter"}
PROTOCOL_KEYS = ("seqlen", "limit", "split", "windows", "harness_version", "task_version", "num_fewshot")


def build_document(run: RunData, others: list[RunData]) -> Document:
    """The report's sections: overview, metrics, plan, method records, recovery, runs, recipe, environment."""
    model = run.metrics.get("model") or (run.plan or {}).get("base", {}).get("name") or "?"
    sub = (f"model {model} · run directory {run.path} · generated {time.strftime('%Y-%m-%d %H:%M:%S')} "
           f"by shearkit {__version__}")
    sections = [s for s in (_overview(run), _metrics(run, others), *_plan(run), _recovery(run),
                            _runs(run, others), _recipe(run), _env(run)) if s is not None and s.blocks]
    return Document(f"shearkit report: {run.label}", sub, sections)


def _overview(run: RunData) -> Section:
    s = Section("Overview")
    p = run.metrics.get("prune") or {}
    bits = []
    if p:
        bits.append(f"Pruned with {p.get('method')} ({p.get('kind', (run.plan or {}).get('kind', '?'))}) to a target "
                    f"ratio of {_pct(p.get('ratio_target'))}; achieved {_pct(p.get('ratio_achieved'))}.")
    elif run.plan:
        bits.append(f"Plan: {run.plan.get('method')} ({run.plan.get('kind')}), target "
                    f"{_pct(run.plan.get('ratio_target'))}, achieved {_pct(run.plan.get('ratio_achieved'))}.")
    r = run.metrics.get("recover") or {}
    if r:
        bits.append("Recovered with LoRA" + (f" in {r['wall_s']:.0f} s." if isinstance(r.get("wall_s"), (int, float))
                                             else "."))
    dense_p = (run.metrics.get("dense") or {}).get("params") or {}
    now_p = run.metrics.get("params") or {}
    if dense_p.get("unique") and now_p.get("unique"):
        bits.append(f"Parameters: {dense_p['unique']:,} dense → {now_p['unique']:,} "
                    f"({now_p['unique'] / dense_p['unique']:.1%}).")
    bits += _stage_sentences(run)
    if not bits:
        bits.append("An evaluation run (no plan).")
    s.blocks.append(Text(" ".join(bits)))
    s.blocks += [Text(f"Note: {n}") for n in run.notes]
    return s


def _stage_sentences(run: RunData, limit: int = 3) -> list[str]:
    """One sentence per task (the first `limit`): its main metric dense, pruned before recovery and final."""
    cmp = compare(run, [])
    cols = [(name, cmp.stage[k]) for k, name in (("dense", "dense"), ("pruned", "pruned before recovery"),
                                                 ("final", "final")) if k in cmp.stage]
    if len(cols) < 2:
        return []
    out = []
    for t, m, vals in cmp.rows:
        if m == cmp.main.get(t) and all(vals[j] is not None for _, j in cols) and len(out) < limit:
            out.append(f"{t} {m}: " + ", ".join(f"{fmt(vals[j])} {name}" for name, j in cols) + ".")
    return out


def _metrics(run: RunData, others: list[RunData]) -> Section | None:
    cmp = compare(run, others)
    if not cmp.rows:
        return None
    s = Section("Metrics")
    final, dense, pruned = (cmp.stage.get(k) for k in ("final", "dense", "pruned"))
    deltas = []  # (header, column, reference column)
    if final is not None and dense is not None:
        deltas.append((f"Δ {cmp.columns[final]} vs dense", final, dense))
    if final is not None and pruned is not None:
        deltas.append(("Δ by recovery", final, pruned))
    rows = []
    for row in cmp.rows:
        cells: list[Any] = [row[0], row[1], *row[2]]
        for _, col, ref in deltas:
            d = cmp.delta(row, col, ref)
            cells.append(None if d is None else f"{d:+.4g}")
        rows.append(cells)
    s.blocks.append(Text("Perplexity (ppl…) is lower-is-better; accuracies are fractions, higher is better. "
                         "The main metric of a zero-shot task is acc_norm where the harness defines it, else acc."
                         + (" The pruned model was measured before recovery too, so the columns show what "
                            "pruning cost and what recovery won back." if pruned is not None else "")))
    s.blocks.append(Table(["task", "metric", *cmp.columns, *[d[0] for d in deltas]], rows, "metrics"))
    png = plots.metrics(metric_panels(cmp))
    if png:
        stages = "dense, pruned before recovery, recovered" if pruned is not None else "each model"
        s.blocks.append(Figure("metrics", f"Main metric per task: {stages}"
                               + (" and the runs compared" if others else "") + ".", png))
    rows, warnings = _protocols(cmp)
    if rows:
        s.blocks.append(Table(["task", "measured with"], rows, "protocol"))
    s.blocks += [Text(w) for w in warnings]
    return s


def _protocols(cmp: Comparison) -> tuple[list[list[str]], list[str]]:
    """How each task was measured (rows), and a warning where columns used different protocols."""
    sets = list(zip(cmp.columns, cmp.tasks))
    rows, warnings = [], []
    tasks = list(dict.fromkeys(t for _, ts in sets for t in ts))
    for t in tasks:
        protos = {lab: {k: ts[t].get(k) for k in PROTOCOL_KEYS if k in ts[t]} for lab, ts in sets
                  if isinstance(ts.get(t), dict)}
        distinct = {tuple(sorted(p.items())) for p in protos.values()}
        if len(distinct) > 1:
            rows.append([t, "differs by column (see the warning below)"])
            warnings.append(f"Warning: '{t}' was measured under different protocols, so its columns are not "
                            "directly comparable: " + "; ".join(f"{lab}: {_kv(p)}" for lab, p in protos.items()) + ".")
        elif distinct:
            rows.append([t, _kv(dict(next(iter(distinct))))])
    return rows, warnings


def _plan(run: RunData) -> list[Section]:
    plan = run.plan
    if not plan:
        return []
    s = Section("Plan")
    p = run.metrics.get("prune") or {}
    info = [["method", plan.get("method")], ["kind", plan.get("kind")], ["ratio target", plan.get("ratio_target")],
            ["ratio achieved", plan.get("ratio_achieved")],
            ["base model", (plan.get("base") or {}).get("name")],
            ["base fingerprint", (plan.get("base") or {}).get("fingerprint")],
            ["layers", (plan.get("base") or {}).get("num_layers")]]
    if plan.get("blocks"):
        info.append(["removed blocks", ", ".join(map(str, sorted(plan["blocks"])))])
    if plan.get("replaced"):
        info.append(["replaced blocks", ", ".join(f"{k}→{v}" for k, v in sorted(plan["replaced"].items(),
                                                                           key=lambda kv: int(kv[0])))])
    if plan.get("hidden_channels"):
        info.append(["removed hidden channels", len(plan["hidden_channels"])])
    if isinstance(p.get("wall_s"), (int, float)):
        info.append(["pruning wall time (s)", p["wall_s"]])
    if isinstance(p.get("peak_memory_bytes"), (int, float)):
        info.append([f"peak memory (MiB, {p.get('peak_memory_kind', 'process')})", p["peak_memory_bytes"] / 2**20])
    s.blocks.append(Table(["", "value"], info, "plan-info"))
    kind = plan.get("kind")
    title = f"{plan.get('method')} at {_pct(plan.get('ratio_achieved'))}"
    if kind == "unstructured":
        modules, rows = unstructured_layers(plan)
        same = flat_value({m: [r[2 + j] for r in rows] for j, m in enumerate(modules)}) if rows and modules else None
        if same is not None:  # uniform sparsity: flat lines would say no more than this sentence
            s.blocks.append(Text(f"Every module of every layer has sparsity {_pct(same)} "
                                 f"({', '.join(sorted({str(r[1]) for r in rows}))})."))
        elif rows:
            s.blocks.append(Figure("plan", "Sparsity of each module per layer.",
                                   plots.unstructured_plan(modules, rows, title)))
        if rows:
            s.blocks.append(Table(["layer", "pattern", *modules], rows, "plan-layers"))
    else:
        rows = structured_layers(plan)
        if rows and kind == "blocks" and not plan.get("layers"):
            s.blocks.append(Figure("plan", "Blocks kept, removed and replaced.", plots.block_plan(rows, title)))
            s.blocks.append(Table(["block", "status"], [[r.layer, r.status] for r in rows], "plan-layers"))
        elif rows:
            known = all(r.heads is not None for r in rows)
            marks = "; ".join(m for m, on in (("green: dense layers, left unpruned", any(r.dense for r in rows)),
                                              ("grey: removed blocks", any(r.status == "removed" for r in rows)),
                                              ("yellow: replaced blocks",
                                               any(r.status.startswith("replaced") for r in rows))) if on)
            cap = ("Fraction of query heads, KV heads, MLP channels" + (" and parameters" if rows[0].params else "")
                   + " each layer kept" if known else "Removed heads and channels per layer as the plan lists them "
                   "(the plan does not record the base widths)") + (f" ({marks})." if marks else ".")
            s.blocks.append(Figure("plan", cap, plots.structured_plan(rows, title)))
            if known:
                with_params = all(r.params for r in rows)
                s.blocks.append(Table(["layer", "status", "heads kept", "KV heads kept", "MLP channels kept",
                                       *(["parameters kept"] if with_params else [])],
                                      [[r.layer, r.status, f"{r.heads_kept}/{r.heads}", f"{r.kv_kept}/{r.kv_heads}",
                                        f"{r.mlp_kept}/{r.mlp}",
                                        *([_pct(r.kept_fractions()["parameters"])] if with_params else [])]
                                       for r in rows], "plan-layers"))
            else:
                s.blocks.append(Table(["layer", "status", "heads removed", "KV groups removed", "MLP channels removed"],
                                      [[r.layer, r.status, r.heads_removed, r.kv_removed, r.mlp_removed]
                                       for r in rows], "plan-layers"))
    out = [s]
    extra = [(k, v) for k, v in numeric_series(plan.get("extra") or {}) if k not in PLAN_RECORDS]
    if extra:
        e = Section("Method records")
        e.blocks.append(Text("Per-layer (or per-step) records the method kept in the plan: importance scores, "
                             "knowledge distribution, schedules."))
        n_layers = (plan.get("base") or {}).get("num_layers")
        for key, data in extra:
            lengths = {len(v) for v in data.values()}
            xlabel = "layer" if lengths == {n_layers} else "index"
            same = flat_value(data)
            if same is not None:  # a figure of identical bars says nothing: one sentence does
                e.blocks.append(Text(f"{key.replace('_', ' ')}: all {sum(lengths)} values are {fmt(same)}."))
            else:
                e.blocks.append(Figure(f"extra-{_slug(key)}", f"{key.replace('_', ' ')} by {xlabel}.",
                                       plots.series(key, data, xlabel)))
        out.append(e)
    return out


def _recovery(run: RunData) -> Section | None:
    r = run.metrics.get("recover") or {}
    if not run.train_log and not r:
        return None
    s = Section("Recovery")
    png = plots.losses(run.train_log, f"LoRA recovery: {run.label}") if run.train_log else None
    if png:
        s.blocks.append(Figure("loss", f"Training loss, learning rate and (when logged) evaluation perplexity by "
                               f"step ({TRAIN_LOG}); the last values are written beside their points.", png))
    last = next((x for x in reversed(run.train_log) if "loss" in x), None)
    info: list[list[Any]] = [[k, v] for k, v in r.items() if isinstance(v, (int, float, str))
                             and k not in ("losses", *RECOVERY_FILES)]
    for key, name in RECOVERY_FILES.items():  # stored relative to the run directory
        if r.get(key):
            found = run.find(r[key])
            info.append([name, found.relative_to(run.path).as_posix() if found else f"{r[key]} (not found)"])
    if last:
        info += [["last logged step", last.get("step")], ["last loss", last.get("loss")]]
        if last.get("tokens_seen") is not None:
            info.append(["tokens seen", last["tokens_seen"]])
    if info:
        s.blocks.append(Table(["", "value"], info, "recovery"))
    return s


def _runs(run: RunData, others: list[RunData]) -> Section | None:
    if not others:
        return None
    s = Section("Runs compared")
    rows = []
    for r in [run, *others]:
        p = r.metrics.get("prune") or {}
        plan = r.plan or {}
        rows.append([r.label, r.metrics.get("model"), p.get("method") or plan.get("method"),
                     p.get("ratio_target", plan.get("ratio_target")), p.get("ratio_achieved", plan.get("ratio_achieved")),
                     (r.metrics.get("recover") or {}).get("steps") or (r.train_log[-1].get("step") if r.train_log else None),
                     (r.metrics.get("params") or {}).get("unique"), str(r.path)])
    s.blocks.append(Table(["run", "model", "method", "ratio target", "ratio achieved", "recovery steps",
                           "params", "directory"], rows, "runs"))
    return s


def _recipe(run: RunData) -> Section | None:
    if not run.recipe_text:
        return None
    return Section("Recipe", [Text("The fully resolved recipe (recipe.yaml); `shearkit run` on it repeats the run."),
                              Code(run.recipe_text, "yaml")])


def _env(run: RunData) -> Section | None:
    env = run.env or {}
    if not env:
        return None
    rows = [[k, env.get(k)] for k in ("device", "cuda", "threads", "seed", "python", "platform", "time") if k in env]
    rows += [[where, v] for where, v in (env.get("seeds") or {}).items()]  # each seed the recipe set
    rows += [[pkg, v] for pkg, v in (env.get("versions") or {}).items()]
    return Section("Environment", [Table(["", "value"], rows, "env")])


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "?"


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "no protocol recorded"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


__all__ = ["build_document"]
