"""Command: recover (LoRA fine-tuning of a pruned model, merged on save)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .app import (CACHE_OPT, DATA_OPT, DEVICE_OPT, DTYPE_OPT, MODEL_ARG, MODEL_OPT, OUT_OPT, OVERWRITE_OPT,
                  RECIPE_OPT, SET_OPT, TRUST_OPT, app, check_resume_flags, model_section, pick_model)


@app.command("recover")
def recover_cmd(
    model: Optional[str] = MODEL_ARG,
    model_opt: Optional[str] = MODEL_OPT,
    data: Optional[str] = typer.Option(None, "--data", help="Named set (alpaca, lima, gsm8k: instructions; c4, wiki: "
                                       "text) or a .json/.jsonl/.txt file. Default alpaca."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 200)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 2e-4)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="LoRA rank (default 8)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (default 16)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per micro-batch (default 4)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per step (default 1)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", help="Packed window / maximum example length (default 512)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine | linear | constant"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Perplexity every N steps (and before/after)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (for --resume)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Dense model to distil from (with --distill)."),
    distill: Optional[float] = typer.Option(None, "--distill", help="Weight of the distillation loss, 0..1."),
    save_adapter: bool = typer.Option(False, "--save-adapter", help="Also save the adapters (peft format)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, cache_dir: Optional[str] = CACHE_OPT,
    data_dir: Optional[str] = DATA_OPT, out: Optional[str] = OUT_OPT, overwrite: bool = OVERWRITE_OPT,
    recipe: Optional[str] = RECIPE_OPT, set_: Optional[List[str]] = SET_OPT, trust_remote_code: bool = TRUST_OPT,
) -> None:
    """Recover a (pruned) model with LoRA and save the merged model in <run>/model.

    A sparse model keeps exactly its zeros (LoRA is trained and merged under its masks: those
    saved with its plan, else its zeros).

    Example: shearkit recover runs/lp20/model --data alpaca --steps 200 --out runs/lp20-rec
    """
    from ..recipe import load_recipe

    m = pick_model(model, model_opt, required=recipe is None)
    check_resume_flags(resume, overwrite, out)
    r = load_recipe(recipe, set_, extra={
        "model": model_section(m, device, dtype, cache_dir, trust_remote_code),
        "recover": {"data": data, "steps": steps, "lr": lr, "rank": rank, "alpha": alpha, "batch_size": batch_size,
                    "grad_accum": grad_accum, "seqlen": seqlen, "schedule": schedule, "eval_every": eval_every,
                    "save_every": save_every, "distill_weight": distill, "save_adapter": save_adapter or None,
                    "seed": seed, "data_dir": data_dir}})
    if r.get("recover") is None:
        from ..recovery import RecoverConfig

        r.sections["recover"] = RecoverConfig()
    metrics = run_recover(r, out, overwrite, resume, teacher)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2, default=str))
    else:
        h = metrics["recover"]
        typer.echo(f"loss {h['loss_first']:.4f} -> {h['loss_last']:.4f} over {h['steps_done']} steps; "
                   f"{h['budget']['statement']}" if h["loss_first"] is not None else "no step was trained")
        if h.get("stop_message"):  # a NaN/divergence stop: where, what was kept, what to change
            typer.echo(h["stop_message"])
        elif h.get("stopped"):
            typer.echo(f"stopped early ({h['stopped']}) at step {h['stopped_at']}")


def run_recover(r, out: Optional[str], overwrite: bool, resume: bool = False, teacher: Optional[str] = None) -> dict:
    """Load the model (and teacher), recover it, save the merged model and write the run directory."""
    from .. import api
    from ..errors import ShearkitError
    from ..preflight import check_recovery_data
    from ..recovery import recover
    from ..runs import RunDir, recipe_inputs

    rc, mc = r.get("recover"), r.model
    if rc.distill_weight > 0 and not teacher:
        raise ShearkitError("--distill needs --teacher, the dense model to distil from.")
    if not rc.merge:
        raise ShearkitError("The recover command saves the merged model; set recover.merge true "
                            "(use --save-adapter to keep the adapters as well).")
    check_recovery_data(rc, rc.data_dir)  # the data, before a run directory or a model load
    run = RunDir(r.out_dir(out), "recover", overwrite, reuse=resume, inputs=[*recipe_inputs(r), teacher],
                 recipe=r)
    with run:
        run.write_recipe(r)
        run.log(f"loading {mc.name}")
        model, tok = api.load(mc.name, device=mc.device, dtype=mc.dtype, cache_dir=mc.cache_dir,
                              trust_remote_code=mc.trust_remote_code)
        run.write_env(str(next(model.parameters()).device), r.seeds())
        tmodel = None
        if teacher and rc.distill_weight > 0:
            run.log(f"loading teacher {teacher}")
            tmodel = api.load(teacher, device=mc.device, dtype=mc.dtype, cache_dir=mc.cache_dir,
                              trust_remote_code=mc.trust_remote_code)[0]
        plan = input_plan(mc.name, model)
        model, history = recover(model, tok, rc, teacher=tmodel, out_dir=run.path, resume=resume,
                                 data_dir=rc.data_dir, masks=plan if plan is not None else "auto")
        run.log(f"recovery: {history['budget']['statement']}; stopped={history['stopped']}; "
                f"{history['masked_layers']} layers kept their zeros")
        # a resumed run replaces only its own output; under a launcher the main process saves
        saver = save_model(model, tok, run.path / "model", plan=plan, evals=history.get("eval") or {},
                           overwrite=resume) if run.writer else None
        metrics = {"model": mc.name, "saved_with": saver,
                   "recover": {k: v for k, v in history.items() if k != "losses"}}
        run.write_metrics(metrics)
        typer.echo(f"run directory: {run.path}", err=True)
        return metrics


def input_plan(source: str, model):
    """The plan saved with an input model directory (with its masks, or masks from the model's
    zeros when the masks file is absent), or None."""
    from ..plan import Plan

    path = Path(source).expanduser()
    if not (path / "plan.json").is_file():
        return None
    return Plan.load(path, model=model)


def save_model(model, tokenizer, path: Path, plan=None, evals: dict | None = None,
               overwrite: bool = False) -> str:
    """Save the recovered model with shearkit's saver (per-layer widths, provenance, card).

    The plan of a pruned input model (see `input_plan`) is carried over with its masks, and the
    last perplexities measured during recovery go into the card. Returns which saver ran.
    """
    from ..io.save import save

    numeric = [k for k in (evals or {}) if isinstance(k, int)]
    last = (evals or {}).get(max(numeric)) if numeric else None
    metrics = {task: {"ppl": v, "when": "after recovery"} for task, v in last.items()} if last else None
    save(model, tokenizer, path, plan=plan, metrics=metrics, overwrite=overwrite)
    return "shearkit.io.save"
