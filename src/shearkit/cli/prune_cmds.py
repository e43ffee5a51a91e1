"""Commands: prune, run, plan show."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from .app import (CACHE_OPT, DATA_OPT, DEVICE_OPT, DTYPE_OPT, LAZY_OPT, MAX_MEMORY_OPT, MODEL_ARG, MODEL_OPT, OUT_OPT,
                  OVERWRITE_OPT, RECIPE_OPT, SET_OPT, TRUST_OPT, app, check_resume_flags, model_section, pick_model, print_table)
from .core import metric_rows

plan_app = typer.Typer(help="Inspect pruning plans.", no_args_is_help=True)
app.add_typer(plan_app, name="plan")


@app.command("prune")
def prune_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    method: Optional[str] = typer.Option(None, "--method", help="Pruning method (see `shearkit list`), e.g. "
                                         "llm-pruner, wanda, sparsegpt, besa."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Structured methods: fraction of the decoder blocks' "
                                          "parameters removed. Unstructured: sparsity of their linear weights. Block methods: "
                                          "fraction of the blocks removed."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Alias of --ratio for unstructured methods."),
    blocks: Optional[int] = typer.Option(None, "--blocks", help="Block methods (shortgpt, flexigpt): number of blocks "
                                         "removed or replaced (instead of --ratio, which takes round(ratio x blocks))."),
    nm: Optional[str] = typer.Option(None, "--nm", help="N:M pattern for unstructured methods, e.g. 2:4."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Structured methods: uniform | global | a "
                                             "JSON file of per-layer (and per-kind) ratios, e.g. from `shearkit analyze`."),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="Structured methods: kept MLP widths are "
                                           "multiples of this (default 8; 32 lets every GGUF q8_0 row quantise, "
                                           "64 suits matmul kernels)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data set or file (default c4)."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration windows (default 64)."),
    calib_seqlen: Optional[int] = typer.Option(None, "--calib-seqlen", help="Tokens per window (default 512)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    recover_steps: Optional[int] = typer.Option(None, "--recover", help="LoRA recovery steps after pruning."),
    recover_data: Optional[str] = typer.Option(None, "--recover-data", help="Recovery data (default alpaca)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Evaluate after pruning (default wikitext2)."),
    eval_seqlen: Optional[int] = typer.Option(None, "--eval-seqlen"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N windows / examples."),
    no_dense_eval: bool = typer.Option(False, "--no-dense-eval", help="Skip evaluating the dense model first."),
    save_format: Optional[str] = typer.Option(None, "--save-format", help="dense | compressed-tensors | gguf (dense + model.gguf) | none"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan and the ratio it reaches without cutting."),
    as_json: bool = typer.Option(False, "--json"),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    data_dir: Optional[str] = DATA_OPT, out: Optional[str] = OUT_OPT, overwrite: bool = OVERWRITE_OPT,
    recipe: Optional[str] = RECIPE_OPT, set_: Optional[List[str]] = SET_OPT, trust_remote_code: bool = TRUST_OPT,
    lazy: bool = LAZY_OPT, max_memory: Optional[str] = MAX_MEMORY_OPT,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out with the same options: "
                                "every stage (blockwise loop, gradient pass, training, recovery) goes on from its "
                                "newest checkpoint, to the result of an uninterrupted run."),
) -> None:
    """Prune a model, optionally recover it with LoRA, evaluate it and save it.

    Example: shearkit prune smollm2-135m --method llm-pruner --ratio 0.2 --recover 200
    """
    from ..errors import ShearkitError
    from ..recipe import load_recipe

    if ratio is not None and sparsity is not None and ratio != sparsity:
        raise ShearkitError("Give --ratio or --sparsity, not both.")
    r_val = ratio if ratio is not None else sparsity
    if r_val is not None and not 0.0 < r_val < 1.0:
        raise ShearkitError(f"--ratio must be strictly between 0 and 1 (got {r_val}); e.g. --ratio 0.2 removes 20%.")
    m = pick_model(model, model_opt, required=recipe is None)
    if recipe is None and not method:
        raise ShearkitError("No method given: pass --method (see `shearkit list` for the methods).")
    prune_sec = {"method": method, "ratio": r_val, "blocks": blocks, "nm": nm, "seed": seed, "allocation": allocation,
                 "round_to": round_to}
    extra = {
        "model": model_section(m, device, dtype, cache_dir, trust_remote_code, lazy, max_memory),
        "calib": {"dataset": calib, "samples": calib_samples, "seqlen": calib_seqlen, "seed": seed,
                  "data_dir": data_dir},
        "prune": prune_sec,
        "eval": {"tasks": tasks, "seqlen": eval_seqlen, "limit": limit, "data_dir": data_dir},
        "save_format": save_format,
        "eval_dense": False if no_dense_eval else None,
    }
    if recover_steps is not None or recover_data is not None:
        extra["recover"] = {"steps": recover_steps, "data": recover_data}
    check_resume_flags(resume, overwrite, out)
    _run(load_recipe(recipe, set_, extra=extra), out, overwrite, dry_run, "prune", as_json, resume)


@app.command("run")
def run_cmd(
    recipe_path: Optional[str] = typer.Argument(None, metavar="RECIPE", help="YAML recipe of the whole run."),
    method: Optional[str] = typer.Option(None, "--method", help="Without a recipe: the method (defaults for the rest)."),
    ratio: Optional[float] = typer.Option(None, "--ratio"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default smollm2-135m)."),
    dry_run: bool = typer.Option(False, "--dry-run"),
    as_json: bool = typer.Option(False, "--json"),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, data_dir: Optional[str] = DATA_OPT,
    out: Optional[str] = OUT_OPT, overwrite: bool = OVERWRITE_OPT, set_: Optional[List[str]] = SET_OPT,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out with the same options: "
                                "every stage (blockwise loop, gradient pass, training, recovery) goes on from its "
                                "newest checkpoint, to the result of an uninterrupted run."),
) -> None:
    """Run load -> prune -> recover -> evaluate -> report from a recipe (or --method/--ratio with defaults).

    RECIPE is a YAML file or the name of a shipped recipe (quick, llm-pruner, wanda, sparsegpt, besa, ...).

    Example: shearkit run quick
    """
    from ..errors import ShearkitError
    from ..recipe import load_recipe

    if recipe_path is None and method is None:
        raise ShearkitError("Give a recipe (a YAML file, or a shipped name such as `quick`) or --method and --ratio.")
    if recipe_path is None:
        recipe_path = "quick"  # defaults for everything but the method and ratio
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ShearkitError(f"--ratio must be strictly between 0 and 1 (got {ratio}).")
    extra = {"model": model_section(model, device, dtype, None, False),
             "prune": {"method": method, "ratio": ratio} if method or ratio is not None else None,
             "calib": {"data_dir": data_dir} if data_dir else None,
             "eval": {"data_dir": data_dir} if data_dir else None}
    r = load_recipe(recipe_path, set_, extra={k: v for k, v in extra.items() if v})
    check_resume_flags(resume, overwrite, out)
    result = _run(r, out, overwrite, dry_run, "run", as_json, resume)
    from ..runs import process_rank

    if not dry_run and process_rank() == 0:  # under a launcher the main process writes the report
        from ..report import write_report

        paths = write_report(result["run_dir"])
        typer.echo(f"report: {paths}", err=True)


def _run(recipe, out, overwrite, dry_run, command, as_json, resume=False) -> dict:
    from ..pipeline import run_pipeline

    result = run_pipeline(recipe, out=out, overwrite=overwrite, dry_run=dry_run, command=command,
                          echo=lambda s: typer.echo(s, err=True), resume=resume)
    plan = result.pop("plan", None)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
        return result
    if plan is not None:
        _print_plan(plan)
    if "prune" in result:
        p = result["prune"]
        typer.echo(f"{p['method']}: ratio target {p['ratio_target']:.4f}, achieved {p['ratio_achieved']:.4f}, "
                   f"{p['wall_s']:.1f} s")
    if "tasks" in result:
        rows = metric_rows(result["tasks"])
        dense = result.get("dense", {}).get("tasks", {})
        for row in rows:
            d = dense.get(row[0], {})
            row.append(d.get("metrics", {}).get(row[1], d.get("value")) if d else "-")
        print_table(f"shearkit {command}", ["task", "metric", "value", "dense"], rows)
    return result


def _print_plan(plan) -> None:
    title = f"plan: {plan.method} ({plan.kind}), ratio target {plan.ratio_target}, achieved {plan.ratio_achieved:.4f}"
    if plan.kind == "structured":
        from ..graph.summary import plan_summary, plan_table

        headers, rows = plan_table(plan)
        print_table(title, headers, rows)
        typer.echo(f"export: {plan_summary(plan)['export']}")
    elif plan.kind == "blocks":
        print_table(title, *_block_rows(plan))
    else:
        print_table(title, ["layer", "sparsity"], plan.summary_rows())
    if plan.blocks:
        typer.echo(f"blocks removed: {plan.blocks}")
    if plan.replaced:
        typer.echo(f"blocks replaced (block <- shared source): {plan.replaced}")


def _block_rows(plan) -> tuple[list[str], list[list]]:
    """Headers and one row per block of a block plan: its score(s) and whether it stays."""
    scores = (plan.extra or {}).get("block_scores") or {}
    n = (plan.base or {}).get("num_layers") or max([*plan.blocks, *map(int, plan.replaced), -1]) + 1
    status = {i: "removed" for i in plan.blocks} | {int(k): f"replaced by {v}" for k, v in plan.replaced.items()}
    rows = [[i, *(f"{v[i]:.4f}" for v in scores.values()), status.get(i, "kept")] for i in range(n)]
    return ["block", *(f"score ({k})" for k in scores), "status"], rows


@plan_app.command("show")
def plan_show(path: str = typer.Argument(..., help="plan.json, or a run / model directory holding one"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Print a plan as a table."""
    from ..plan import Plan

    plan = Plan.load(path)
    if as_json:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
        return
    b = plan.base
    typer.echo(f"base: {b.get('name')} ({b.get('model_type')}, fingerprint {b.get('fingerprint')}); "
               f"shearkit {plan.shearkit_version}; created {plan.created}")
    _print_plan(plan)
