"""`shearkit.prune` and `shearkit.apply_plan`: run a method, then cut (or zero) what it chose.

Structured methods decide a plan from statistics and leave the model as it is; `apply_plan`
then slices it (surgery). Methods that must prune as they go (blockwise ones such as SparseGPT,
whose next block sees the previous pruned block's output) declare `in_place = True`: their
`run` modifies the model and returns the plan that records what it did.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from .errors import ShearkitError
from .methods import MethodContext, PruneConfig, check_family, get_method, method_config
from .plan import Plan


def resolve_config(method: str | PruneConfig, ratio: float | None = None, **options: Any) -> PruneConfig:
    """A method config from a name plus options, or a config object as given."""
    if isinstance(method, PruneConfig):
        if ratio is not None or options:
            raise ShearkitError("Pass either a config object or a method name with options, not both.")
        return method
    data = {"method": method, **options}
    if ratio is not None:
        data["ratio"] = ratio
    return method_config(data)


def prune(model, tokenizer, method: str | PruneConfig, ratio: float | None = None, *, calib=None,
          dry_run: bool = False, data_dir: str | os.PathLike | None = None,
          run_dir: str | os.PathLike | None = None, resume: bool = False, **options: Any) -> Plan:
    """Prune `model` in place with a registered method and return the plan.

    Args:
        method: a method name (see `shearkit list`) or a method config object.
        ratio: structured methods: fraction of the decoder blocks' parameters to remove;
            unstructured methods: sparsity of the blocks' linear weights; block methods: fraction
            of the blocks removed, round(ratio x blocks) (or `blocks=K` for exactly K).
        calib: a LongTensor (n, seqlen) of calibration tokens, or a `CalibConfig`; default:
            64 windows of 512 tokens from `c4`.
        dry_run: decide the plan without changing `model`.
        data_dir: folder of local data sets (calibration, and training data for methods that train).
        run_dir: a folder where the method keeps its checkpoints (the blockwise loop's finished
            blocks, a gradient pass's accumulators, training checkpoints and logs; None: it writes
            nothing); `resume`: continue the method from its checkpoints there, to the result of an
            uninterrupted run (a checkpoint made under other settings, data or base weights is refused).
        options: further fields of the method's config.

    Raises:
        ShearkitError: the method does not support the model's family (the message lists those it does).
    """
    from .io.lazy import is_lazy, require_materialized
    from .surgery.shared_block import refuse_shared

    cfg = resolve_config(method, ratio, **options)
    cls = get_method(cfg.method)
    check_family(cfg.method, model)  # before any calibration data is read
    refuse_shared(model, "pruning it again")
    if is_lazy(model):
        if not cls.lazy_ok:
            require_materialized(model, f"Method '{cfg.method}'")
        if dry_run and cls.in_place:
            raise ShearkitError("A dry run copies the model, and this model was loaded block by block (--lazy or "
                                "--max-memory); run it without --dry-run, or load the model whole.")
    if resume and run_dir is None:
        raise ShearkitError("resume=True needs run_dir, the folder that holds the method's checkpoints.")
    impl = cls(cfg)
    tokens = calib_tokens(tokenizer, calib, data_dir) if cls.needs_calibration else None
    ctx = MethodContext(tokenizer, calib=tokens, data_dir=None if data_dir is None else str(data_dir),
                        run_dir=None if run_dir is None else Path(run_dir), resume=resume, seed=cfg.seed)
    target = copy.deepcopy(model) if (dry_run and cls.in_place) else model
    plan = impl.run(target, ctx)
    if not dry_run and not cls.in_place:
        apply_plan(model, plan, check=False)
    return plan


def calib_tokens(tokenizer, calib, data_dir=None):
    """Calibration tokens from a tensor, a CalibConfig, or the default config."""
    import torch

    from .data import calibration_windows
    from .recipe import CalibConfig

    if isinstance(calib, torch.Tensor):
        return calib
    c = calib if isinstance(calib, CalibConfig) else CalibConfig()
    return calibration_windows(tokenizer, c.dataset, c.samples, c.seqlen, c.seed, c.data_dir or data_dir)


def apply_plan(model, plan: Plan, *, check: bool = True, masks: dict | None = None):
    """Apply a plan to its base model (structured: slice; blocks: remove the blocks it lists;
    unstructured: zero with its masks, or `masks` when given).

    With `check`, a plan made for another model is refused.
    """
    if check:
        plan.check_base(model)
    if plan.kind in ("structured", "blocks"):
        from .surgery import apply_structured

        return apply_structured(model, plan)
    if plan.kind == "unstructured":
        from .sparsity.apply import apply_masks

        return apply_masks(model, plan, masks)
    raise ShearkitError(f"Plan kind '{plan.kind}' is not one shearkit can apply: it applies 'structured' plans "
                        "(which may also list removed blocks), 'blocks' and 'unstructured' ones.")
