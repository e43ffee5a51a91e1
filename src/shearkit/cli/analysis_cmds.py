"""Commands: graph (a model's removable structures), analyze (knowledge distribution)."""
from __future__ import annotations

import json
from typing import Optional

import typer

from .app import (CACHE_OPT, DATA_OPT, DEVICE_OPT, DTYPE_OPT, LAZY_OPT, MAX_MEMORY_OPT, MODEL_ARG, MODEL_OPT, TRUST_OPT,
                  app, pick_model, print_table)


@app.command("graph")
def graph_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Also count LoRA entries for adapters of this "
                                            "rank on every block projection (a model with adapters is counted as it is)."),
    hidden: bool = typer.Option(False, "--hidden", help="Add the hidden-channel group across all blocks (llama family)."),
    query_heads: bool = typer.Option(False, "--query-heads", help="List query heads too (under GQA)."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a plot of the parameters per layer and kind (.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the raw table as JSON."),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Show a model's minimally removable structures per layer: KV groups, query heads, MLP channels
    (and hidden channels), with the parameters (and LoRA entries) each holds.

    Example: shearkit graph smollm2-135m --lora-rank 8 --plot groups.png
    """
    from .. import api
    from ..graph.describe import HEADERS, describe_groups, plot_groups, table_rows

    m = pick_model(model, model_opt)
    mdl, _ = api.load(m, device=device, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    records = describe_groups(mdl, lora_rank=lora_rank, hidden=hidden,
                              attn_unit="query_heads" if query_heads else "kv_group")
    if plot:
        typer.echo(f"plot: {plot_groups(records, plot, title=f'{m}: parameters per layer and kind')}", err=True)
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    print_table(f"shearkit graph {m}", HEADERS, table_rows(records))


@app.command("analyze")
def analyze_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    ratio: float = typer.Option(..., "--ratio", help="Overall ratio the targets reach: fraction of the decoder "
                                "blocks' parameters removed."),
    out: str = typer.Option(..., "--out", help="Sensitivity file to write (JSON; use it as --allocation)."),
    trial_ratio: float = typer.Option(0.5, "--trial-ratio", help="Fraction of each node group zeroed in its trial."),
    proxy: str = typer.Option("magnitude", "--proxy", help="magnitude (data-free) | taylor (calibration gradients)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Fraction of node groups kept whole, the most "
                                          "sensitive first (default 0.1)."),
    tokens: int = typer.Option(4096, "--tokens", help="Held-out tokens, cut into windows of --seqlen."),
    seqlen: int = typer.Option(512, "--seqlen", help="Held-out window length."),
    data: str = typer.Option("wiki", "--data", help="Held-out text set or file (not the evaluation set)."),
    calib: str = typer.Option("c4", "--calib", help="Calibration set for --proxy taylor (disjoint from the "
                              "held-out windows when it is the same set)."),
    calib_samples: int = typer.Option(8, "--calib-samples", help="Calibration windows (of --seqlen) for taylor."),
    round_to: int = typer.Option(8, "--round-to", help="MLP widths kept at multiples of this (as the prune's)."),
    seed: int = typer.Option(0, "--seed"),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a plot of the deviation per layer (.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the sensitivity record as JSON."),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    data_dir: Optional[str] = DATA_OPT, trust_remote_code: bool = TRUST_OPT,
    lazy: bool = LAZY_OPT, max_memory: Optional[str] = MAX_MEMORY_OPT,
) -> None:
    """Knowledge distribution: prune each layer's attention and MLP alone at a trial ratio, measure the
    held-out perplexity deviation, keep the most sensitive whole and write per-structure targets.

    Example: shearkit analyze smollm2-135m --ratio 0.2 --out sens.json --plot sens.png
    then:    shearkit prune smollm2-135m --method structured-magnitude --ratio 0.2 --allocation sens.json
    """
    from pathlib import Path

    from .. import api
    from ..analysis import DEFAULT_GAMMA, analyze, plot_sensitivity, write_sensitivity
    from ..analysis.sensitivity import TABLE_HEADERS, table_rows
    from ..errors import ShearkitError

    m = pick_model(model, model_opt)
    if seqlen < 2 or tokens < seqlen:
        raise ShearkitError(f"--tokens ({tokens}) must hold at least one window of --seqlen ({seqlen} >= 2) tokens.")
    if Path(out).suffix != ".json":
        raise ShearkitError(f"--out is the sensitivity file, a .json path; got '{out}'.")
    mdl, tok = api.load(m, device=device, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust_remote_code,
                        lazy=lazy, max_memory=max_memory)
    rec = analyze(mdl, tok, ratio, trial_ratio=trial_ratio, proxy=proxy,
                  gamma=DEFAULT_GAMMA if gamma is None else gamma, windows=tokens // seqlen, seqlen=seqlen,
                  dataset=data, calib=calib, calib_samples=calib_samples, round_to=round_to, seed=seed,
                  data_dir=data_dir)
    rec["model"] = m
    write_sensitivity(rec, out)
    typer.echo(f"sensitivity: {out}", err=True)
    if plot:
        plot_sensitivity(rec, plot)
        typer.echo(f"plot: {plot}", err=True)
    if as_json:
        typer.echo(json.dumps(rec, indent=2))
        return
    h = rec["heldout"]
    print_table(f"shearkit analyze {m}: dense held-out ppl {rec['dense_ppl']:.4g} ({h['dataset']}, {h['windows']} x "
                f"{h['seqlen']} tokens), proxy {rec['proxy']}, trial ratio {rec['trial_ratio']}", TABLE_HEADERS,
                table_rows(rec))
    typer.echo(f"kept whole (gamma {rec['gamma']}): {', '.join(rec['unprunable']) or 'none'}; targets reach "
               f"{rec['ratio_reached']:.4f} of the blocks' parameters (asked {ratio}); "
               f"{len(rec['nodes'])} trials in {rec['trials_wall_s']:.1f} s")
