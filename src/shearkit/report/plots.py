"""Report figures as PNG bytes (matplotlib's object API on the Agg canvas: no display, no global state)."""
from __future__ import annotations

import io
from typing import Any

from .summary import PRUNED_STAGE, LayerRow, Panel

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


DENSE = "#d5ecd4"
REPLACED = "#f2c14e"


def _shade_layers(ax, rows: list[LayerRow]) -> list:
    """Shade removed blocks grey, replaced ones yellow and layers kept dense on purpose green; returns
    legend handles for the kinds present."""
    from matplotlib.patches import Patch

    kinds = {}
    for r in rows:
        if r.status == "removed":
            color, alpha, label = REMOVED, 0.5, "block removed"
        elif r.status.startswith("replaced"):
            color, alpha, label = REPLACED, 0.4, "block replaced by another"
        elif r.dense:
            color, alpha, label = DENSE, 1.0, "dense layer (not pruned)"
        else:
            continue
        ax.axvspan(r.layer - 0.5, r.layer + 0.5, color=color, alpha=alpha, lw=0, zorder=0)
        kinds[label] = Patch(color=color, alpha=alpha, label=label)
    return list(kinds.values())


def structured_plan(rows: list[LayerRow], title: str) -> bytes:
    """Fraction of query heads, KV heads, MLP channels and parameters each layer kept; without the
    base widths, the removed counts the plan lists. Dense layers are shaded green, removed blocks grey,
    replaced ones yellow."""
    known = all(r.heads is not None for r in rows)
    x = [r.layer for r in rows]
    if known:
        fig = _figure(min(14.0, max(8.0, 0.3 * len(rows) + 4)), 3.8)
        ax = fig.subplots()
        fr = [r.kept_fractions() for r in rows]
        w = 0.38
        ax.bar([i - w / 2 for i in x], [f["query heads"] for f in fr], w, color="#4c72b0", label="query heads kept")
        ax.bar([i + w / 2 for i in x], [f["MLP channels"] for f in fr], w, color="#55a868", label="MLP channels kept")
        ax.plot([i - w / 2 for i in x], [f["KV heads"] for f in fr], "o", color="#dd8452", ms=4, label="KV heads kept")
        params = [(i, f["parameters"]) for i, f in zip(x, fr) if f["parameters"] is not None]
        if params:
            ax.plot([p[0] for p in params], [p[1] for p in params], "k_", ms=14, mew=2, label="parameters kept")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction kept")
        axes = [ax]
    else:
        fig = _figure(min(14.0, max(8.0, 0.3 * len(rows) + 4)), 5.2)
        ax1, ax2 = axes = fig.subplots(2, 1, sharex=True)
        ax1.bar(x, [r.heads_removed for r in rows], color="#c44e52", label="removed query heads (listed)")
        ax1.plot(x, [r.kv_removed for r in rows], "o", color="#dd8452", ms=4, label="removed KV groups (listed)")
        ax1.set_ylabel("attention heads")
        ax2.bar(x, [r.mlp_removed for r in rows], color="#c44e52", label="removed MLP channels")
        ax2.set_ylabel("MLP channels")
    for ax in axes:
        shades = _shade_layers(ax, rows)
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + shades, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xlim(min(x) - 0.6, max(x) + 0.6)
        _integer_x(ax)
    axes[-1].set_xlabel("layer")
    axes[0].set_title(title)
    return _png(fig)


def block_plan(rows: list[LayerRow], title: str) -> bytes:
    """One cell per block: kept, removed (grey) or replaced by another block's weights (yellow)."""
    fig = _figure(8, 1.9)
    ax = fig.subplots()
    for r in rows:
        color = REMOVED if r.status == "removed" else REPLACED if r.status.startswith("replaced") else "#4c72b0"
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


def _ema(xs: list[float], decay: float = 0.9) -> list[float]:
    out, ema = [], xs[0]
    for x in xs:
        ema = decay * ema + (1 - decay) * x
        out.append(ema)
    return out


def _mark_last(ax, xs: list[float], ys: list[float], color: str, below: bool = False) -> None:
    """Circle the last point and write its value beside it (above, or `below`), so the end of the
    curve is readable."""
    ax.plot([xs[-1]], [ys[-1]], "o", color=color, ms=5)
    ax.annotate(f"{ys[-1]:.4g}", (xs[-1], ys[-1]), xytext=(-4, -7 if below else 6), textcoords="offset points",
                fontsize=8, color=color, ha="right", va="top" if below else "bottom")


def losses(log: list[dict[str, Any]], title: str) -> bytes | None:
    """`loss_figure` as PNG bytes (None when nothing was logged)."""
    fig = loss_figure(log, title)
    return None if fig is None else _png(fig)


def loss_figure(log: list[dict[str, Any]], title: str):
    """Training loss (smoothed when noisy), evaluation perplexity when logged, and the learning rate
    against step. Legends sit outside the axes and the last points are labelled with their values."""
    pts = [(r["step"], r["loss"]) for r in log if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_ppl"]) for r in log if r.get("eval_ppl") is not None]
    if not pts and not evals:
        return None
    lrs = [(r["step"], r["lr"]) for r in log if isinstance(r.get("lr"), (int, float))]
    fig = _figure(9, 4.6 if lrs else 3.4)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1]) if lrs else [fig.subplots()]
    ax = axes[0]
    handles = []
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        noisy = len(ys) > 30
        handles += ax.plot(xs, ys, lw=0.8 if noisy else 1.2, alpha=0.45 if noisy else 1.0, color="#4c72b0",
                           label="train loss")
        if noisy:  # many per-batch losses are noisy; show the trend too
            handles += ax.plot(xs, _ema(ys), lw=1.8, color="#4c72b0", label="train loss (EMA 0.9)")
        _mark_last(ax, xs, ys, "#4c72b0")  # the last loss itself, not its lagging average
        ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        tasks = sorted({t for _, e in evals for t in (e if isinstance(e, dict) else {"eval": e})})
        for k, t in enumerate(tasks):
            xy = [(s, (e if isinstance(e, dict) else {"eval": e}).get(t)) for s, e in evals]
            xy = [(s, v) for s, v in xy if isinstance(v, (int, float))]
            color = f"C{k + 1}"
            handles += ax2.plot([p[0] for p in xy], [p[1] for p in xy], "o--", ms=4, color=color,
                                label=f"{_short(t)} ppl (right axis)")
            if xy:
                _mark_last(ax2, [p[0] for p in xy], [p[1] for p in xy], color, below=True)
        ax2.set_ylabel("perplexity")
        ax2.margins(y=0.12)  # room for the value written under the last point
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.08 if evals else 1.01, 1.0),
              frameon=False)
    ax.margins(x=0.06, y=0.1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lrs:
        axes[1].plot([p[0] for p in lrs], [p[1] for p in lrs], color="#8172b3", lw=1.2)
        axes[1].set_ylabel("lr")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig


def _colors(panels: list[Panel]) -> dict[str, str]:
    """One colour per column across panels: dense grey, pruned-before-recovery red, then the others."""
    palette = iter(["#4c72b0", "#55a868", "#8172b3", "#dd8452", "#937860", "#da8bc3", "#64b5cd"])
    out: dict[str, str] = {}
    for p in panels:
        for label, _ in p.series:
            if label not in out:
                out[label] = "#8c8c8c" if label == "dense" else "#c44e52" if label == PRUNED_STAGE else next(
                    palette, "#333333")
    return out


def metrics(panels: list[Panel]) -> bytes | None:
    """Grouped bars per task of each column's main metric (dense, pruned before recovery, the run,
    other runs), each bar labelled with its value; perplexities in their own panel, on a log scale
    when they span more than a factor of 5."""
    if not panels:
        return None
    colors = _colors(panels)
    k_max = max(len(p.series) for p in panels)
    widths = [max(2.5, 0.5 * len(p.tasks) * max(1, len(p.series)) + 1.2) for p in panels]
    fig = _figure(min(14.0, max(7.0, sum(widths) + 0.5)), 4.2)
    axes = fig.subplots(1, len(panels), width_ratios=widths) if len(panels) > 1 else [fig.subplots()]
    for ax, panel in zip(axes, panels):
        k = max(1, len(panel.series))
        w = 0.8 / k
        values = [y for _, ys in panel.series for y in ys if y is not None]
        for j, (label, ys) in enumerate(panel.series):
            xs = [i + (j - (k - 1) / 2) * w for i in range(len(panel.tasks))]
            keep = [(x, y) for x, y in zip(xs, ys) if y is not None]
            bars = ax.bar([x for x, _ in keep], [y for _, y in keep], w, label=label, color=colors[label])
            ax.bar_label(bars, labels=[f"{y:.3g}" if panel.lower_is_better else f"{y:.2f}" for _, y in keep],
                         fontsize=7, padding=2, rotation=90 if k_max > 3 else 0)
        ax.set_xticks(range(len(panel.tasks)), [_short(t) for t in panel.tasks], rotation=30, ha="right", fontsize=8)
        if panel.lower_is_better:
            ax.set_ylabel("perplexity (lower is better)")
            if values and min(values) > 0 and max(values) / min(values) > 5:
                ax.set_yscale("log")
                ax.set_ylabel("perplexity (lower is better, log scale)")
            ax.margins(y=0.15)
        else:
            ax.set_ylabel("accuracy (main metric, higher is better)")
            ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)
    handles = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(4, len(handles)),
               fontsize=8, frameon=False)
    return _png(fig)
