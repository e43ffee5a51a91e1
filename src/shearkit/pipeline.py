"""One run, end to end: load -> prune -> recover -> evaluate -> save, into one run directory.

`shearkit prune` and `shearkit run` both go through `run_pipeline`; what a run does is what its
recipe says (a `prune` section, an optional `recover` section, an `eval` section).
"""
from __future__ import annotations

import shutil
import time
from typing import Any, Callable

from .errors import ShearkitError
from .preflight import check_recipe_data
from .recipe import Recipe
from .runs import RunDir, recipe_inputs

SAVE_FORMATS = ("dense", "compressed-tensors", "gguf", "none")  # gguf: the dense folder plus model.gguf (f16)


def run_pipeline(recipe: Recipe, *, out: str | None = None, overwrite: bool = False, dry_run: bool = False,
                 command: str = "run", echo=print, resume: bool = False) -> dict[str, Any]:
    """Execute a recipe and return its metrics (also written to `<run>/metrics.json`); `resume`
    continues an interrupted run in `out` (its method's and its recovery's checkpoints)."""
    from . import api
    from .arch import get_adapter
    from .eval.speed import PeakMemory
    from .io.lazy import is_lazy, require_materialized
    from .pruning import calib_tokens, prune

    save_format = recipe.top.get("save_format", "dense")
    if save_format not in SAVE_FORMATS:
        raise ShearkitError(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got '{save_format}'.")
    pcfg = recipe.get("prune")
    rcfg = recipe.get("recover")
    step = _steps(recipe, dry_run, echo)
    if pcfg is None and rcfg is None:
        if recipe.get("extend") is not None:
            raise ShearkitError("This recipe extends a model (an 'extend' section): run it with "
                                "`shearkit extend --recipe RECIPE`.")
        raise ShearkitError("The recipe has neither a 'prune' nor a 'recover' section: nothing to run. "
                            "Add e.g. `prune: {method: llm-pruner, ratio: 0.2}`.")
    check_recipe_data(recipe)  # every data set the run reads, before a run directory or a model load
    run = RunDir(recipe.out_dir(out), command, overwrite, reuse=resume, inputs=recipe_inputs(recipe), recipe=recipe)
    if resume and (run.path / "model").exists():  # the resumed run replaces its own saved model, never an input
        from .io.guard import refuse_unsafe_removal

        refuse_unsafe_removal(run.path / "model", recipe_inputs(recipe))
    metrics: dict[str, Any] = {"model": recipe.model.name}
    with run:
        run.write_recipe(recipe)
        mc, ec = recipe.model, recipe.eval
        step(f"loading {mc.name}")
        # a lazy model's pruned blocks until the model is saved (another process's: a temporary folder)
        lazy_dir = run.path / "lazy-blocks" if run.writer else None
        if lazy_dir is not None:
            shutil.rmtree(lazy_dir, ignore_errors=True)  # an interrupted run's: its blocks are redone or re-applied
        model, tok = api.load(mc.name, **mc.load_options(), work_dir=lazy_dir)
        if is_lazy(model):  # what needs every weight at once is refused before the long part of the run
            if rcfg is not None and getattr(rcfg, "steps", 0) > 0:
                require_materialized(model, "LoRA recovery")
            if save_format in ("gguf", "compressed-tensors"):
                require_materialized(model, f"save_format {save_format}")
        if save_format == "gguf":  # refuse a family GGUF export cannot take before the long part of the run
            from .io.gguf_export import check_family

            check_family(model)
        device = next(model.parameters()).device
        run.write_env(str(device), recipe.seeds())
        data_dir = ec.data_dir or recipe.calib.data_dir
        evaluate = lambda m: api.evaluate(m, tok, ec.tasks, seqlen=ec.seqlen, limit=ec.limit,  # noqa: E731
                                          batch_size=ec.batch_size, split=ec.split, data_dir=data_dir)
        if recipe.top.get("eval_dense", True) and not dry_run:
            step("evaluating the dense model")
            metrics["dense"] = {"tasks": evaluate(model), "params": get_adapter(model).param_counts()}
            run.write_metrics(metrics)
        plan = None
        if pcfg is not None:
            step(f"pruning with {pcfg.method} at ratio {pcfg.ratio}")
            tokens = None
            from .methods import check_family, get_method

            check_family(pcfg.method, model)  # before the calibration data is read
            if get_method(pcfg.method).needs_calibration:
                tokens = calib_tokens(tok, recipe.calib, data_dir)
            t0 = time.perf_counter()
            with PeakMemory(device) as pm:
                # a method that trains keeps its logs and checkpoints in the run directory
                plan = prune(model, tok, pcfg, calib=tokens, dry_run=dry_run, data_dir=data_dir, run_dir=run.path,
                             resume=resume)
            metrics["prune"] = {"method": plan.method, "kind": plan.kind, "ratio_target": plan.ratio_target,
                                "ratio_achieved": plan.ratio_achieved, "wall_s": time.perf_counter() - t0,
                                "peak_memory_bytes": pm.peak, "peak_memory_kind": "cuda_max_allocated"
                                if device.type == "cuda" else "process_rss"}
            if run.writer:
                plan.save(run.path / "plan.json")  # an unstructured plan's masks go beside it
            run.log(f"plan: ratio achieved {plan.ratio_achieved:.4f}")
            if dry_run:
                run.write_metrics(metrics)
                return {**metrics, "plan": plan, "run_dir": str(run.path)}
        if rcfg is not None and getattr(rcfg, "steps", 0) > 0:
            if plan is not None:  # the figure before recovery, to show what recovery buys
                step("evaluating the pruned model before recovery")
                metrics["pruned"] = {"tasks": evaluate(model)}
                run.write_metrics(metrics)
            step(f"LoRA recovery, {rcfg.steps} steps")
            from .recovery import recover

            teacher = None
            if getattr(rcfg, "distill_weight", 0):
                teacher = api.load(mc.name, device=mc.device, dtype=mc.dtype, cache_dir=mc.cache_dir)[0]
            t0 = time.perf_counter()
            # a sparse model keeps its zeros: LoRA is trained and merged under the plan's masks
            model, history = recover(model, tok, rcfg, teacher=teacher, out_dir=run.path, data_dir=data_dir,
                                     masks=plan if plan is not None else "auto", resume=resume)
            metrics["recover"] = {**_plain(history), "wall_s": time.perf_counter() - t0}
        step("evaluating and saving")
        metrics["tasks"] = evaluate(model)
        metrics["params"] = get_adapter(model).param_counts()
        if save_format != "none" and run.writer:
            _save_model(model, tok, run, plan, metrics, save_format, overwrite=resume)
        run.write_metrics(metrics)
        if is_lazy(model) and lazy_dir is not None:
            shutil.rmtree(lazy_dir, ignore_errors=True)  # saved in the run's model folder now
        echo(f"run directory: {run.path}")
        return {**metrics, "run_dir": str(run.path)}


def _steps(recipe: Recipe, dry_run: bool, echo) -> Callable[[str], None]:
    """A progress printer numbering the steps this recipe runs: `[i/n] what`."""
    prunes, recovers = recipe.get("prune") is not None, getattr(recipe.get("recover"), "steps", 0) > 0
    dense = bool(recipe.top.get("eval_dense", True)) and not dry_run
    # load, dense eval, prune, then (a dry run stops after pruning) pruned eval, recover, final eval and save
    n = 1 + dense + prunes + (0 if dry_run and prunes else (prunes and recovers) + recovers + 1)
    done = [0]

    def step(what: str) -> None:
        done[0] += 1
        echo(f"[{done[0]}/{n}] {what}")
    return step


def _plain(history: Any) -> dict:
    if isinstance(history, dict):
        return {k: v for k, v in history.items() if k != "log"}
    return {"history": str(history)}


def _save_model(model, tok, run: RunDir, plan, metrics: dict, save_format: str, overwrite: bool = False) -> None:
    from .io.save import save

    if save_format == "compressed-tensors":
        from .io.sparse_export import save_compressed

        save_compressed(model, tok, run.path / "model", plan=plan, overwrite=overwrite)
    else:
        save(model, tok, run.path / "model", plan=plan, metrics=metrics, overwrite=overwrite)
    if save_format == "gguf":  # beside the Hugging Face folder, which users still expect
        from .io.gguf_export import export_gguf

        export_gguf(model, tok, run.path / "model.gguf", outtype="f16", overwrite=overwrite)
