"""What a recipe needs, checked before a run directory is made or a model is loaded.

Every data set a run names (calibration, evaluation, recovery data and recovery evaluation) is
resolved here, so a missing file, an unset data directory or an unreachable hub is reported in
a second instead of after a model load (and half a minute of hub retries).
"""
from __future__ import annotations

from typing import Iterable

from .recipe import Recipe

PARTS = ("eval", "calib", "recover")


def check_recipe_data(recipe: Recipe, parts: Iterable[str] = PARTS) -> None:
    """Raise ShearkitError now if a data set the recipe's `parts` will read cannot be had.

    `eval`: the evaluation tasks (perplexity sets and zero-shot tasks); `calib`: the calibration
    set, when the prune method needs one; `recover`: the recovery data and its evaluation sets.
    Data directories are resolved as the pipeline resolves them.
    """
    from . import api
    from .data.availability import check_text_set

    parts = set(parts)
    ec, cc = recipe.eval, recipe.calib
    shared_dir = ec.data_dir or cc.data_dir  # what run_pipeline hands to evaluation and recovery
    if "eval" in parts:
        ppl, zeroshot = api.check_tasks(ec.tasks, shared_dir)
        for t in ppl:
            check_text_set(t, ec.split, shared_dir, "evaluation")
        if zeroshot:
            _check_zeroshot_hub(zeroshot, shared_dir)
    pcfg = recipe.get("prune")
    if "calib" in parts and pcfg is not None:
        from .data import DATASETS
        from .methods import get_method

        if get_method(pcfg.method).needs_calibration:
            ds = DATASETS.get(cc.dataset)
            split = "train" if ds is not None and not ds.calibration_ok else None
            check_text_set(cc.dataset, split, cc.data_dir or shared_dir, "calibration")
    rcfg = recipe.get("recover")
    if "recover" in parts and rcfg is not None and getattr(rcfg, "steps", 0) > 0:
        check_recovery_data(rcfg, shared_dir or rcfg.data_dir)


def check_recovery_data(rcfg, data_dir=None) -> None:
    """Raise ShearkitError now if the recovery data or its evaluation sets cannot be had."""
    from .data.availability import check_instruction_set, check_text_set
    from .recovery.data import resolve_mode

    if resolve_mode(rcfg.data, rcfg.mode) == "instruction":
        check_instruction_set(rcfg.data, data_dir)
    else:
        check_text_set(rcfg.data, rcfg.split or "train", data_dir, "recovery data")
    if rcfg.eval_every:
        for t in rcfg.eval_tasks:
            check_text_set(t, None, data_dir, "recovery evaluation")


def _check_zeroshot_hub(tasks: list[str], data_dir) -> None:
    """Zero-shot tasks without a local file run from the hub: probe it once (offline is refused by
    the task resolver already)."""
    from .data.availability import check_hub
    from .eval.zeroshot import resolve_tasks

    hub = [r.requested for r in resolve_tasks(tasks, data_dir) if r.source == "hub"]
    if hub:
        check_hub(f"Zero-shot task(s) {', '.join(hub)}")
