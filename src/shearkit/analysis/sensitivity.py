"""Knowledge-distribution analysis (LoRAShear Alg. 3): how much each node group matters, and the
per-structure pruning targets that follow.

For every node group (layer x attention, layer x MLP) alone: score its groups by a proxy, zero
the lowest-scored `trial_ratio` of them (KV groups with their query heads, or MLP channels; base
weights and any LoRA factors) inside `masking.zeroed`, measure the perplexity on a small held-out
slice, restore the model bit for bit. The deviation from the dense perplexity ranks the node
groups; the most sensitive fraction gamma is kept whole and the rest get targets that reach the
overall parameter ratio (`targets.allocate`). The result is written as a JSON file that every
structured method takes as its allocation (`--allocation FILE`: `layer_ratios`, `attn_ratios`,
`mlp_ratios`).

Proxies: `magnitude` (squared weight norm, data-free, the default) or `taylor` (LLM-Pruner's
first-order |w * dL/dw| from calibration gradients). Not the LoRA-based proxies: before LoRA
warm-up B = 0 and they are all zero (LoRAShear pitfall 1.10.4).

Held-out slice: `windows` x `seqlen` tokens of a text set (default `wiki`, Wikipedia articles;
not WikiText-2 test, the evaluation set). Taylor's calibration windows come from `calib` (default
`c4`); when both name the same set they are drawn together, so no window is in both.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..graph.groups import kv_groups, mlp_channels
from ..graph.removal import layer_params_after
from ..io.lazy import loaded_block, require_materialized
from .masking import node_removal, zeroed
from .targets import KINDS, allocate, block_params, most_sensitive, node_units

PROXIES = ("magnitude", "taylor")
DEFAULT_GAMMA = 0.1  # the spec's range is 0.1-0.2; the low end leaves the others room at high ratios


def heldout_and_calib(tokenizer, *, dataset: str, windows: int, seqlen: int, calib: str | None, calib_samples: int,
                      seed: int, data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(held-out windows, calibration windows or None), disjoint when both come from one set."""
    from ..data import calibration_windows

    if calib is None:
        return calibration_windows(tokenizer, dataset, windows, seqlen, seed, data_dir), None
    if calib == dataset:
        both = calibration_windows(tokenizer, dataset, windows + calib_samples, seqlen, seed, data_dir)
        return both[:windows].clone(), both[windows:].clone()
    return (calibration_windows(tokenizer, dataset, windows, seqlen, seed, data_dir),
            calibration_windows(tokenizer, calib, calib_samples, seqlen, seed, data_dir))


def heldout_ppl(model: nn.Module, windows: torch.Tensor) -> float:
    """Perplexity over the held-out windows (each scored on its own)."""
    from ..eval.perplexity import window_nll

    sums = window_nll(model, windows, desc=None)
    return math.exp(float(sums.sum()) / (windows.shape[0] * (windows.shape[1] - 1)))


def trial_entry(model: nn.Module, layer: int, kind: str, trial_ratio: float, proxy: str, stats) -> dict[str, list[int]]:
    """The lowest-scored `trial_ratio` of one node group's units as a plan layer entry (at least one
    unit, and at least one KV group / MLP channel left)."""
    from ..importance import magnitude, taylor

    m = unwrap(model)
    gs = kv_groups(m, layer) if kind == "attn" else mlp_channels(m, layer)
    scores = magnitude(m, gs) if proxy == "magnitude" else taylor(m, gs, stats)
    k = min(max(1, int(trial_ratio * gs.size + 0.5)), gs.size - 1)
    low = torch.argsort(scores, stable=True)[:k].sort().values.tolist()
    return {"kv_groups": low} if kind == "attn" else {"mlp_channels": low}


def analyze(model: nn.Module, tokenizer, ratio: float, *, trial_ratio: float = 0.5, proxy: str = "magnitude",
            gamma: float = DEFAULT_GAMMA, windows: int = 8, seqlen: int = 512, dataset: str = "wiki",
            calib: str = "c4", calib_samples: int = 8, round_to: int = 8, seed: int = 0,
            data_dir: str | os.PathLike | None = None, progress: bool = True,
            heldout: torch.Tensor | None = None, calib_windows: torch.Tensor | None = None,
            checkpoint: str | os.PathLike | None = None, resume: bool = False, save_every: int = 1) -> dict[str, Any]:
    """Measure every node group's sensitivity and derive per-structure targets reaching `ratio`.

    `heldout` / `calib_windows`: windows the caller drew itself (LoRAShear draws every slice of its
    data from disjoint partitions); then `dataset` / `calib` only name where they came from.

    `checkpoint`: a folder where the finished trials (every `save_every` of them) and the taylor
    proxy's gradient pass (every `save_every` batches) are checkpointed (`io.stage_state`); with
    `resume`, an interrupted analysis continues from there to the same record.

    Returns the sensitivity record (`write_sensitivity` saves it): the protocol, the dense held-out
    perplexity, one entry per node group (layer, kind, units zeroed, ppl, deviation, relative
    deviation, unprunable, target units and ratio), and the allocation lists.

    Raises:
        ShearkitError: bad options, too little held-out text, or a ratio the prunable groups cannot give.
    """
    from ..progress import progress as bar

    if proxy not in PROXIES:
        raise ShearkitError(f"proxy must be one of {', '.join(PROXIES)}, got '{proxy}' (LoRA-based proxies are zero "
                            "before LoRA warm-up, so they cannot rank a dense model).")
    if not 0.0 < ratio < 1.0:
        raise ShearkitError(f"ratio must be strictly between 0 and 1, got {ratio}.")
    if not 0.0 < trial_ratio < 1.0:
        raise ShearkitError(f"trial ratio must be strictly between 0 and 1, got {trial_ratio}.")
    if windows < 1 or seqlen < 2 or calib_samples < 1 or round_to < 1:
        raise ShearkitError(f"windows and calib samples must be >= 1, seqlen >= 2 and round_to >= 1; got windows "
                            f"{windows}, calib samples {calib_samples}, seqlen {seqlen}, round_to {round_to}.")
    m = unwrap(model)
    if proxy == "taylor":
        require_materialized(m, "The taylor proxy (a gradient pass)")
    nodes = node_units(m, round_to)
    total = block_params(m)
    if heldout is not None:
        if proxy == "taylor" and calib_windows is None:
            raise ShearkitError("The taylor proxy needs calibration windows beside the given held-out windows: pass "
                                "calib_windows (drawn apart from them), or use proxy 'magnitude'.")
        held, cal = heldout, (calib_windows if proxy == "taylor" else None)
    else:
        held, cal = heldout_and_calib(tokenizer, dataset=dataset, windows=windows, seqlen=seqlen,
                                      calib=calib if proxy == "taylor" else None, calib_samples=calib_samples,
                                      seed=seed, data_dir=data_dir)
    stats = None
    if proxy == "taylor":
        from ..importance import collect_stats

        stats = collect_stats(model, cal, grads=True, desc="taylor gradients" if progress else None,
                              checkpointing=True, loss_chunk=256,  # same scores, a fraction of the memory
                              checkpoint=None if checkpoint is None else Path(checkpoint) / "taylor-gradients",
                              save_every=save_every, resume=resume)
    trials_dir = None if checkpoint is None or save_every < 1 else Path(checkpoint) / "trials"
    identity: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    if trials_dir is not None:
        from ..io.stage_state import read_state, tensor_digest
        from ..plan import base_fingerprint

        identity = {"fingerprint": base_fingerprint(m),
                    "heldout": tensor_digest(held), "calib": None if cal is None else tensor_digest(cal),
                    "proxy": proxy, "trial_ratio": trial_ratio, "round_to": round_to}
        state = read_state(trials_dir, identity, resume=resume, what="sensitivity trials")
        records = list(state["records"]) if state else []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        dense = heldout_ppl(model, held)
        layers = get_adapter(m).layers
        for node in bar(nodes[len(records):], "sensitivity trials" if progress else None, unit="trial"):
            # the trial's block in memory (a lazy model's read from disk; the others load per forward)
            with loaded_block(m, layers[node.layer]):
                entry = trial_entry(m, node.layer, node.kind, trial_ratio, proxy, stats)
                with zeroed(m, node_removal(m, node.layer, entry)):
                    ppl = heldout_ppl(model, held)
            zeroed_units = len(next(iter(entry.values())))
            records.append({"layer": node.layer, "kind": node.kind, "units": node.full, "zeroed": zeroed_units,
                            "ppl": ppl, "deviation": ppl - dense, "relative_deviation": ppl / dense - 1.0,
                            "params": node.params})
            if trials_dir is not None and (len(records) % save_every == 0 or len(records) == len(nodes)):
                from ..io.stage_state import write_state

                write_state(trials_dir, identity, {"records": records})
    finally:
        model.train(was_training)
    wall = time.perf_counter() - t0
    keep = set(most_sensitive([r["relative_deviation"] for r in records], gamma))
    units = allocate(nodes, keep, ratio, total, [r["relative_deviation"] for r in records])
    removed = 0
    layer_params = layer_params_after(m)
    lists: dict[str, list[float]] = {k: [0.0] * len(layer_params) for k in KINDS}
    per_layer = [0] * len(layer_params)
    for j, (node, rec) in enumerate(zip(nodes, records)):
        gone = sum(node.unit_costs[: units[j]])
        frac = sum(node.unit_sizes[: units[j]]) / node.full
        removed += gone
        per_layer[node.layer] += gone
        lists[node.kind][node.layer] = frac
        rec.update(unprunable=j in keep, target_units=units[j], target_ratio=frac, params_removed=gone)
    return {
        "format": "shearkit-sensitivity/1",
        "model": getattr(m.config, "_name_or_path", "") or m.config.model_type,
        "ratio": ratio, "ratio_reached": removed / total, "params_removed": removed, "block_params": total,
        "trial_ratio": trial_ratio, "proxy": proxy, "gamma": gamma, "round_to": round_to,
        "attn_unit": "kv_group", "deviation": "held-out perplexity of the model with the node group pruned at the "
                                              "trial ratio, minus the dense model's",
        "heldout": {"dataset": dataset, "windows": int(held.shape[0]), "seqlen": int(held.shape[1]),
                    "tokens": int(held.numel()), "seed": seed},
        "calibration": ({"dataset": calib, "windows": int(cal.shape[0]), "seqlen": int(cal.shape[1]),
                         "disjoint_from_heldout": True} if cal is not None else None),
        "dense_ppl": dense, "trials_wall_s": wall,
        "nodes": records,
        "unprunable": [f"{nodes[j].layer}.{nodes[j].kind}" for j in sorted(keep)],
        "layer_ratios": [p / lp if lp else 0.0 for p, lp in zip(per_layer, layer_params)],
        "attn_ratios": lists["attn"], "mlp_ratios": lists["mlp"],
    }


def deviation_series(path: str | os.PathLike) -> dict[str, list[float]] | None:
    """The relative deviation per layer of each kind in a sensitivity file (`{"attn": [...],
    "mlp": [...]}`, what a run's report plots as the knowledge distribution), or None when the
    allocation file holds no trials."""
    import json
    from pathlib import Path

    return deviation_series_of(json.loads(Path(path).read_text()))


def deviation_series_of(record: dict[str, Any]) -> dict[str, list[float]] | None:
    """`deviation_series` of a sensitivity record already in memory."""
    nodes = record.get("nodes") if isinstance(record, dict) else None
    if not isinstance(nodes, list) or not nodes:
        return None
    layers = 1 + max(int(n["layer"]) for n in nodes)
    out = {k: [0.0] * layers for k in KINDS}
    for n in nodes:
        out[n["kind"]][int(n["layer"])] = float(n["relative_deviation"])
    return out


def write_sensitivity(record: dict[str, Any], path: str | os.PathLike) -> None:
    """Save a sensitivity record as JSON, atomically (usable as `--allocation`)."""
    from ..io.atomic import write_json

    write_json(path, record)


def table_rows(record: dict[str, Any]) -> list[list[Any]]:
    """Rows `layer, kind, zeroed, ppl, deviation, relative, kept whole, target ratio` of a record."""
    return [[r["layer"], r["kind"], f"{r['zeroed']}/{r['units']}", r["ppl"], r["deviation"],
             f"{100 * r['relative_deviation']:.1f}%", "yes" if r["unprunable"] else "",
             f"{100 * r['target_ratio']:.1f}%"] for r in record["nodes"]]


TABLE_HEADERS = ["layer", "kind", "zeroed", "ppl", "deviation", "relative", "kept whole", "target"]


def plot_sensitivity(record: dict[str, Any], path: str | os.PathLike) -> None:
    """Deviation per layer, attention and MLP, with the node groups kept whole circled."""
    from ..io.atomic import atomic_file
    from ..report.plots import _figure, _integer_x

    fig = _figure(min(14.0, max(8.0, 0.3 * (len(record["nodes"]) // 2) + 4)), 3.8)
    ax = fig.subplots()
    colors = {"attn": "#4c72b0", "mlp": "#55a868"}
    for kind, label in (("attn", "attention"), ("mlp", "MLP")):
        rs = [r for r in record["nodes"] if r["kind"] == kind]
        ax.plot([r["layer"] for r in rs], [r["relative_deviation"] for r in rs], "o-", ms=4, lw=1.2,
                color=colors[kind], label=label)
        kept = [r for r in rs if r["unprunable"]]
        if kept:
            ax.plot([r["layer"] for r in kept], [r["relative_deviation"] for r in kept], "o", ms=10, mfc="none",
                    mec="#c44e52", mew=1.5)
    ax.plot([], [], "o", ms=10, mfc="none", mec="#c44e52", mew=1.5, label=f"kept whole (gamma {record['gamma']})")
    if any(r["relative_deviation"] > 0 for r in record["nodes"]):
        ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out perplexity increase (relative)")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"knowledge distribution: {record['model']} (proxy {record['proxy']}, trial ratio "
                 f"{record['trial_ratio']}, dense ppl {record['dense_ppl']:.3g})", fontsize=10)
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
