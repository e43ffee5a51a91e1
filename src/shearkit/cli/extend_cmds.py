"""Command: extend (grow a model by weight-shared copies of its blocks, train them, evaluate, save)."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from .app import (CACHE_OPT, DATA_OPT, DEVICE_OPT, DTYPE_OPT, MODEL_ARG, MODEL_OPT, OUT_OPT, OVERWRITE_OPT,
                  RECIPE_OPT, SET_OPT, TRUST_OPT, app, check_resume_flags, model_section, pick_model, print_table)
from .core import metric_rows


@app.command("extend")
def extend_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    add_blocks: Optional[int] = typer.Option(None, "--add-blocks", help="Blocks to add (K): a multiple of the "
                                             "span's length."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="block: repeat each block of the span in place; "
                                          "sequential: repeat the whole span after itself (default block)."),
    start: Optional[int] = typer.Option(None, "--start", help="First block of the repeated span (default 0)."),
    end: Optional[int] = typer.Option(None, "--end", help="Last block of the repeated span, inclusive (default the "
                                      "last block)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="The copies' adapter rank (default hidden / 16)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps for the copies (default 128; 0: none)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training text: c4, wiki or a .txt/.jsonl file "
                                       "(default c4)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Evaluate the original and the extended model "
                                        "(default wikitext2)."),
    eval_seqlen: Optional[int] = typer.Option(None, "--eval-seqlen"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N windows / examples."),
    no_dense_eval: bool = typer.Option(False, "--no-dense-eval", help="Skip evaluating the original model."),
    resume: bool = typer.Option(False, "--resume", help="Continue the training from its checkpoints in --out."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    data_dir: Optional[str] = DATA_OPT, out: Optional[str] = OUT_OPT, overwrite: bool = OVERWRITE_OPT,
    recipe: Optional[str] = RECIPE_OPT, set_: Optional[List[str]] = SET_OPT, trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Extend a model with weight-shared copies of its blocks (own adapters and output norms), train
    those, evaluate and save it (it reloads with shearkit.load or trust_remote_code=True).

    Example: shearkit extend smollm2-135m --add-blocks 6 --start 12 --end 17 --out runs/ext6
    """
    from ..recipe import load_recipe

    m = pick_model(model, model_opt, required=recipe is None)
    check_resume_flags(resume, overwrite, out)
    # training flags as overrides of single keys, so the recipe's other training settings stay
    flags = [f"extend.train.{k}={v}" for k, v in (("steps", steps), ("data", data)) if v is not None and steps != 0]
    if steps == 0:
        flags.append("extend.training=false")
    r = load_recipe(recipe, [*flags, *(set_ or [])], extra={
        "model": model_section(m, device, dtype, cache_dir, trust_remote_code),
        "extend": {"add_blocks": add_blocks, "pattern": pattern, "start": start, "end": end, "rank": rank,
                   "seed": seed},
        "eval": {"tasks": tasks, "seqlen": eval_seqlen, "limit": limit, "data_dir": data_dir},
        "eval_dense": False if no_dense_eval else None})
    metrics = run_extend(r, out, overwrite, resume, data_dir)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2, default=str))
    else:
        e = metrics["extend"]
        typer.echo(f"{e['blocks_before']} -> {e['blocks_after']} blocks ({e['pattern']} pattern over blocks "
                   f"{e['start']}..{e['end']}); unique parameters {e['params_before']['unique']:,} -> "
                   f"{e['params_after']['unique']:,}")
        print_table("shearkit extend", ["task", "metric", "value"], metric_rows(metrics["tasks"]))


def run_extend(r, out: Optional[str], overwrite: bool, resume: bool = False, data_dir: Optional[str] = None) -> dict:
    """Load the model, extend and train it, evaluate it (and the original) and save it into the run directory."""
    from .. import api
    from ..errors import ShearkitError
    from ..extension import Extender
    from ..io.save import save
    from ..methods.base import MethodContext
    from ..preflight import check_recipe_data, check_recovery_data
    from ..runs import RunDir, recipe_inputs

    ecfg, mc, ev = r.get("extend"), r.model, r.eval
    if resume and not ecfg.training:
        raise ShearkitError("--resume continues the training, and this run trains nothing (extend.training false).")
    data_dir = data_dir or ev.data_dir
    check_recipe_data(r, parts=("eval",))  # every data set, before a run directory or a model load
    if ecfg.training:
        check_recovery_data(ecfg.train_config(ecfg.rank or 8), data_dir)
    run = RunDir(r.out_dir(out), "extend", overwrite, reuse=resume, inputs=recipe_inputs(r), recipe=r)
    with run:
        run.write_recipe(r)
        run.log(f"loading {mc.name}")
        model, tok = api.load(mc.name, device=mc.device, dtype=mc.dtype, cache_dir=mc.cache_dir,
                              trust_remote_code=mc.trust_remote_code)
        run.write_env(str(next(model.parameters()).device), r.seeds())
        evaluate = lambda m: api.evaluate(m, tok, ev.tasks, seqlen=ev.seqlen, limit=ev.limit,  # noqa: E731
                                          batch_size=ev.batch_size, split=ev.split, data_dir=data_dir)
        metrics: dict = {"model": mc.name}
        if r.top.get("eval_dense", True):
            run.log("evaluating the original model")
            metrics["dense"] = {"tasks": evaluate(model)}
            run.write_metrics(metrics)
        ctx = MethodContext(tok, data_dir=data_dir, run_dir=run.path, resume=resume, seed=ecfg.seed)
        run.log(f"extending by {ecfg.add_blocks} blocks ({ecfg.pattern} pattern)")
        metrics["extend"] = Extender(ecfg).run(model, ctx)
        run.log("evaluating and saving the extended model")
        metrics["tasks"] = evaluate(model)
        metrics["params"] = metrics["extend"]["params_after"]
        if run.writer:  # under a launcher the main process saves
            save(model, tok, run.path / "model", metrics=metrics, overwrite=resume)
        run.write_metrics(metrics)
        typer.echo(f"run directory: {run.path}", err=True)
        return metrics
