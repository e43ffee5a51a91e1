"""Commands: eval, bench, generate, list."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from .app import (CACHE_OPT, DATA_OPT, DEVICE_OPT, DTYPE_OPT, LAZY_OPT, MAX_MEMORY_OPT, MODEL_ARG, MODEL_OPT, OUT_OPT,
                  OVERWRITE_OPT, RECIPE_OPT, SET_OPT, TRUST_OPT, app, model_section, pick_model, print_table)


def metric_rows(results: dict[str, dict]) -> list[list]:
    """Rows `task, metric, value` of an evaluate() result (zero-shot tasks may give several metrics)."""
    rows = []
    for task, r in results.items():
        if "metrics" in r:
            rows += [[task, m, v] for m, v in r["metrics"].items()]
        else:
            rows.append([task, r.get("metric", "value"), r["value"]])
    return rows


@app.command("eval")
def eval_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Comma-separated: wikitext2, ptb, or zero-shot "
                                        "tasks (piqa, boolq, ...). Default wikitext2."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Perplexity window length (default 2048, capped at "
                                         "the model's maximum)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N windows / examples (quick runs)."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="Windows (requests) per forward pass, or "
                                             "'auto' (the default): 1 on the CPU, on a GPU the largest that "
                                             "fits in memory. A size that runs out of memory is halved."),
    split: Optional[str] = typer.Option(None, "--split", help="Data split (default: test)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON instead of a table."),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    data_dir: Optional[str] = DATA_OPT, out: Optional[str] = OUT_OPT, overwrite: bool = OVERWRITE_OPT,
    recipe: Optional[str] = RECIPE_OPT, set_: Optional[List[str]] = SET_OPT, trust_remote_code: bool = TRUST_OPT,
    lazy: bool = LAZY_OPT, max_memory: Optional[str] = MAX_MEMORY_OPT,
) -> None:
    """Evaluate a model: perplexity (WikiText-2, PTB) and zero-shot tasks.

    Example: shearkit eval smollm2-135m --tasks wikitext2 --seqlen 512 --limit 8
    """
    from ..recipe import load_recipe

    m = pick_model(model, model_opt, required=recipe is None)
    r = load_recipe(recipe, set_, extra={
        "model": model_section(m, device, dtype, cache_dir, trust_remote_code, lazy, max_memory),
        "eval": {"tasks": tasks, "seqlen": seqlen, "limit": limit, "batch_size": batch_size, "split": split,
                 "data_dir": data_dir}})
    results = run_eval(r, out, overwrite)
    if as_json:
        typer.echo(json.dumps(results, indent=2, default=str))
    else:
        print_table("shearkit eval", ["task", "metric", "value"], metric_rows(results))


def run_eval(r, out: Optional[str], overwrite: bool) -> dict:
    """Load, evaluate and write the run directory for an eval recipe."""
    from .. import api
    from ..preflight import check_recipe_data
    from ..runs import RunDir, recipe_inputs

    check_recipe_data(r, parts=("eval",))  # bad task names, missing data: before a run directory or a model load
    run = RunDir(r.out_dir(out), "eval", overwrite, inputs=recipe_inputs(r))
    with run:
        run.write_recipe(r)
        mc, ec = r.model, r.eval
        run.log(f"loading {mc.name}")
        model, tok = api.load(mc.name, **mc.load_options())
        run.write_env(str(next(model.parameters()).device), r.seeds())
        results = api.evaluate(model, tok, ec.tasks, seqlen=ec.seqlen, limit=ec.limit, batch_size=ec.batch_size,
                               split=ec.split, data_dir=ec.data_dir)
        run.write_metrics({"model": mc.name, "tasks": results})
        run.log(f"results: { {k: v['value'] for k, v in results.items()} }")
        typer.echo(f"run directory: {run.path}", err=True)
        return results


@app.command("bench")
def bench_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    vs: Optional[str] = typer.Option(None, "--vs", help="A baseline model, measured in turn with the first in the "
                                     "same run; ratios read first model / baseline."),
    batch: int = typer.Option(1, "--batch", help="Prefill batch size."),
    length: int = typer.Option(512, "--length", help="Prefill sequence length."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Greedy decode steps timed (KV cache)."),
    repeats: int = typer.Option(5, "--repeats"),
    warmup: int = typer.Option(1, "--warmup"),
    as_json: bool = typer.Option(False, "--json"),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    out: Optional[str] = OUT_OPT, overwrite: bool = OVERWRITE_OPT,
) -> None:
    """Measure parameters, size on disk, prefill and decode tokens/s and peak memory (each model in a
    child process of its own; with --vs, ratios read the model over the baseline, above 1 when faster).

    Example: shearkit bench runs/lp20/model --vs smollm2-135m
    """
    from .. import api
    from ..errors import ShearkitError
    from ..eval.speed import ratio_lines
    from ..runs import RunDir

    m = pick_model(model, model_opt)
    for name, v in (("--batch", batch), ("--length", length), ("--decode-tokens", decode_tokens), ("--repeats", repeats)):
        if v < 1:
            raise ShearkitError(f"{name} must be at least 1, got {v}.")
    names = [m] + ([vs] if vs else [])
    run = RunDir(out, "bench", overwrite, inputs=names)
    with run:  # each model is loaded and measured in a child process of its own (its peak memory is its own)
        res = api.bench(*names, labels=names, batch=batch, length=length, decode_tokens=decode_tokens,
                        repeats=repeats, warmup=warmup, device=device, dtype=dtype, cache_dir=cache_dir)
        run.write_env(res[next(iter(res))]["setting"]["device"])
        run.write_metrics(res)
    if as_json:
        typer.echo(json.dumps(res, indent=2, default=str))
        return
    rows = []
    labels = [k for k in res if k != "ratios"]
    for label in labels:
        r = res[label]
        rows.append([label, r["params"]["unique"], r["params"]["non_embedding"],
                     r["disk_bytes"] / 2**20 if r["disk_bytes"] else "-",
                     r["prefill_tokens_per_s"]["median"], r["decode_tokens_per_s"]["median"],
                     r["peak_memory_bytes"] / 2**20])
    print_table(f"shearkit bench (prefill {batch}x{length}, decode {decode_tokens} tokens, median of {repeats})",
                ["model", "params", "non-emb params", "disk MiB", "prefill tok/s", "decode tok/s", "peak MiB"], rows)
    cuda = res[labels[0]]["peak_memory_kind"] == "cuda_max_allocated"
    typer.echo("peak MiB: each model in a child process of its own, "
               + ("CUDA max allocated" if cuda else "peak RSS above the process's size before the model was loaded")
               + " during one prefill and decode run.")
    if "ratios" in res:
        typer.echo("\n".join(ratio_lines(res["ratios"])))


@app.command("generate")
def generate_cmd(
    model: Optional[str] = MODEL_ARG,
    prompt: str = typer.Argument(..., help="The prompt (a chat template is applied for instruct models)."),
    model_opt: Optional[str] = MODEL_OPT,
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    raw: bool = typer.Option(False, "--raw", help="Do not apply the chat template."),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Greedy completion of a prompt, for a quick look at what a model says.

    Example: shearkit generate smollm2-135m "What is pruning?"
    """
    from .. import api

    m = pick_model(model, model_opt)
    mdl, tok = api.load(m, device=device, dtype=dtype, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    typer.echo(api.generate(mdl, tok, prompt, max_new_tokens=max_new_tokens, chat=False if raw else None))


@app.command("list")
def list_cmd() -> None:
    """Show the pruning methods, model families, data sets and built-in models."""
    from ..arch import supported_families
    from ..data import DATASETS
    from ..models.builtin import BUILTINS

    try:
        from ..methods import METHODS
    except ModuleNotFoundError:
        METHODS = {}
    print_table("methods", ["method", "kind", "families", "description"],
                [[k, v.kind, ", ".join(v.families), v.description] for k, v in sorted(METHODS.items())]
                or [["(none yet)", "", "", ""]])
    print_table("model families", ["family", "model types"],
                [[f, ", ".join(sorted(t))] for f, t in sorted(supported_families().items())])
    print_table("data sets", ["name", "kind", "description"], [[k, v.kind, v.description] for k, v in DATASETS.items()])
    print_table("built-in models", ["name", "description"], [[k, v.description] for k, v in BUILTINS.items()])
