"""Report figures as PNG bytes (matplotlib's object API on the Agg canvas: no display, no global state)."""
from __future__ import annotations

import io
from typing import Any

from .summary import Comparison, LayerRow, is_lower_better

DPI = 100
REMOVED = "#bbbbbb"


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(label: str, n: int = 24) -> str:
    """A tick label that fits: a file path becomes its file name, anything longer is cut with '…'."""
    name = label.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or label
    return name if len(name) <= n else name[: n - 1] + "…"


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _shade_removed(ax, rows: list[LayerRow]) -> None:
    for r in rows:
        if r.status == "removed":
            ax.axvspan(r.layer - 0.5, r.layer + 0.5, color=REMOVED, alpha=0.5, lw=0)
        elif r.status.startswith("replaced"):
            ax.axvspan(r.layer - 0.5, r.layer + 0.5, color="#f2c14e", alpha=0.4, lw=0)


def structured_plan(rows: list[LayerRow], title: str) -> bytes:
    """Kept heads (with KV heads) and kept MLP channels per layer against the base widths; without
    base widths, the removed counts. Removed blocks are shaded grey, replaced ones yellow."""
    known = all(r.heads is not None for r in rows)
    fig = _figure(8, 5.2)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = [r.layer for r in rows]
    if known:
        ax1.bar(x, [r.heads for r in rows], color="none", edgecolor="#555555", lw=0.8, label="base query heads")
        ax1.bar(x, [r.heads_kept for r in rows], color="#4c72b0", label="kept query heads")
        ax1.plot(x, [r.kv_kept for r in rows], "o", color="#dd8452", ms=4, label="kept KV heads")
        ax1.set_ylabel("attention heads")
        ax2.bar(x, [r.mlp for r in rows], color="none", edgecolor="#555555", lw=0.8, label="base channels")
        ax2.bar(x, [r.mlp_kept for r in rows], color="#55a868", label="kept MLP channels")
        ax2.set_ylabel("MLP channels")
    else:
        ax1.bar(x, [r.heads_removed for r in rows], color="#c44e52", label="removed query heads (listed)")
        ax1.plot(x, [r.kv_removed for r in rows], "o", color="#dd8452", ms=4, label="removed KV groups (listed)")
        ax1.set_ylabel("attention heads")
        ax2.bar(x, [r.mlp_removed for r in rows], color="#c44e52", label="removed MLP channels")
        ax2.set_ylabel("MLP channels")
    for ax in (ax1, ax2):
        _shade_removed(ax, rows)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        _integer_x(ax)
    ax2.set_xlabel("layer")
    ax1.set_title(title)
    return _png(fig)


def block_plan(rows: list[LayerRow], title: str) -> bytes:
    """One cell per block: kept, removed (grey) or replaced by another block's weights (yellow)."""
    fig = _figure(8, 1.9)
    ax = fig.subplots()
    for r in rows:
        color = REMOVED if r.status == "removed" else "#f2c14e" if r.status.startswith("replaced") else "#4c72b0"
        ax.bar(r.layer, 1, color=color, edgecolor="white")
        if r.status.startswith("replaced"):
            ax.text(r.layer, 0.5, r.status.split()[-1], ha="center", va="center", fontsize=7)
    ax.set_yticks([])
    _integer_x(ax)
    ax.set_xlabel("block (blue kept, grey removed, yellow replaced by the block named)")
    ax.set_title(title)
    return _png(fig)


def unstructured_plan(modules: list[str], rows: list[list[Any]], title: str) -> bytes:
    """Sparsity of each module per layer, and the layer mean."""
    fig = _figure(8, 4)
    ax = fig.subplots()
    x = [r[0] for r in rows]
    for j, m in enumerate(modules):
        ax.plot(x, [r[2 + j] for r in rows], marker=".", lw=1, label=m)
    means = []
    for r in rows:
        vals = [v for v in r[2:] if v is not None]
        means.append(sum(vals) / len(vals) if vals else None)
    ax.plot(x, means, color="black", lw=2, label="layer mean")
    ax.set_ylim(0, 1)
    _integer_x(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (fraction of weights zero)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def series(name: str, data: dict[str, list[float]], xlabel: str) -> bytes:
    """One or more numeric series from a plan's `extra` (importance, knowledge distribution, ...)."""
    fig = _figure(8, 3.4)
    ax = fig.subplots()
    many = len(data) > 1
    for label, ys in data.items():
        if many or len(ys) > 48:
            ax.plot(range(len(ys)), ys, marker="." if len(ys) <= 64 else None, lw=1, label=label)
        else:
            ax.bar(range(len(ys)), ys, color="#4c72b0", label=label)
    _integer_x(ax)
    ax.set_xlabel(xlabel)
    ax.set_title(name.replace("_", " "))
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8)
    return _png(fig)


def losses(log: list[dict[str, Any]], title: str) -> bytes | None:
    """Training loss (and evaluation perplexity when logged) and the learning rate against step."""
    pts = [(r["step"], r["loss"]) for r in log if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_ppl"]) for r in log if r.get("eval_ppl") is not None]
    if not pts and not evals:
        return None
    lrs = [(r["step"], r["lr"]) for r in log if isinstance(r.get("lr"), (int, float))]
    fig = _figure(8, 4.6 if lrs else 3.4)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1]) if lrs else [fig.subplots()]
    ax = axes[0]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, color="#4c72b0", label="train loss")
        ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        tasks = sorted({t for _, e in evals for t in (e if isinstance(e, dict) else {"eval": e})})
        for t in tasks:
            xy = [(s, (e if isinstance(e, dict) else {"eval": e}).get(t)) for s, e in evals]
            xy = [(s, v) for s, v in xy if isinstance(v, (int, float))]
            ax2.plot([p[0] for p in xy], [p[1] for p in xy], "o--", ms=4, label=f"{t} ppl")
        ax2.set_ylabel("perplexity")
        ax2.legend(fontsize=8, loc="upper center")
    if pts:
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lrs:
        axes[1].plot([p[0] for p in lrs], [p[1] for p in lrs], color="#8172b3", lw=1.2)
        axes[1].set_ylabel("lr")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return _png(fig)


def metrics(cmp: Comparison) -> bytes | None:
    """Grouped bars per task of each model's main metric; perplexities in their own panel."""
    mains = [(t, m) for t, m in cmp.main.items()]
    acc = [(t, m) for t, m in mains if not is_lower_better(m)]
    ppl = [(t, m) for t, m in mains if is_lower_better(m)]
    if not acc and not ppl:
        return None
    panels = [p for p in (acc, ppl) if p]
    widths = [max(2.0, 0.9 * len(p) * max(1, len(cmp.columns)) / 2.5 + 1.5) for p in panels]
    fig = _figure(min(12.0, sum(widths) + 0.5), 3.8)
    axes = fig.subplots(1, len(panels), width_ratios=widths) if len(panels) > 1 else [fig.subplots()]
    lookup = {(t, m): vals for t, m, vals in cmp.rows}
    k = len(cmp.columns)
    w = 0.8 / k
    for ax, panel in zip(axes, panels):
        for j, col in enumerate(cmp.columns):
            ys = [lookup.get(tm, [None] * k)[j] for tm in panel]
            xs = [i + (j - (k - 1) / 2) * w for i in range(len(panel))]
            ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], w, label=col,
                   color=f"C{j}")
        ax.set_xticks(range(len(panel)), [_short(t) for t, _ in panel], rotation=30, ha="right", fontsize=8)
        lower = is_lower_better(panel[0][1])
        ax.set_ylabel("perplexity (lower is better)" if lower else "accuracy (main metric)")
        if not lower:
            ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return _png(fig)
