"""`recover()`: LoRA recovery of a (pruned) model, one user of the shared `Trainer` (`loop.py`).

It wraps the model in peft LoRA adapters (over a sparse model's weights: masked, `masked.py`,
so the zeros stay), trains them with `Trainer(...).fit()` and merges them.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import ShearkitError
from ..recipe import build_config
from .config import RecoverConfig
from .data import build_train_data
from .guard import DivergenceGuard  # noqa: F401  (its historical home; tests import it from here)
from .lora import lora_config
from .loop import Callback, Trainer, check_teacher, refuse_stale

if TYPE_CHECKING:
    from ..plan import Plan


def _resolve_config(config: RecoverConfig | dict | None) -> RecoverConfig:
    if config is None:
        return RecoverConfig()
    if isinstance(config, dict):
        return build_config(RecoverConfig, config, "recover")
    if not isinstance(config, RecoverConfig):
        raise ShearkitError(f"recover() takes a RecoverConfig or a dict, got {type(config).__name__}.")
    return config


class _OnStep(Callback):
    """`recover(on_step=...)` as a callback: `on_step(step, record)` after every optimizer step."""

    name = "on_step"

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_step_end(self, trainer: Trainer, step: int, record: dict) -> None:
        self.fn(step, record)


def recover(model, tokenizer, config: RecoverConfig | dict | None = None, *, teacher=None,
            out_dir: str | os.PathLike | None = None, resume: bool = False,
            data_dir: str | os.PathLike | None = None,
            on_step: Callable[[int, dict], None] | None = None,
            masks: Plan | Mapping[str, torch.Tensor] | str | None = "auto") -> tuple[Any, dict]:
    """Fine-tune LoRA adapters on a (pruned) model to recover its quality, then merge them.

    Args:
        model: a causal LM of a supported family (any per-layer widths), or a peft model whose
            adapters should be trained further. It is trained in place.
        tokenizer: its tokenizer (its chat template, if any, formats instruction data).
        config: a `RecoverConfig` or a dict of its fields.
        teacher: the dense model, for distillation when `config.distill_weight > 0` (moved to
            the training device and put in eval mode; its vocabulary must match).
        out_dir: where `recovery/` (train_log.jsonl, loss.png, checkpoints, adapter) is written; the
            history names these files relative to it.
        resume: continue from the newest checkpoint under `out_dir/recovery` (fresh if none).
        data_dir: the local data directory (default: `config.data_dir`, then $SHEARKIT_DATA).
        on_step: called as `on_step(step, record)` after every optimizer step.
        masks: the zeros to keep (LoRA is trained, evaluated and merged under them, so the
            merged weights have exactly the same zeros): the model's pruning `Plan` (its masks,
            or the model's zeros in the layers it sparsified), a mapping of module name ->
            (out, in) keep-mask, "auto" (default: the adapted weights' zeros, when at least 1%
            of them are zero) or None (a dense update, which fills pruned weights).

    Returns:
        (model, history): the merged model (`config.merge`, default) or the peft model, and a
        record of the run: losses, evaluations, stop reason, restored step, and the budget in
        tokens.
    """
    from accelerate.utils import set_seed
    from peft import PeftModel, get_peft_model

    from ..plan import Plan
    from .masked import mask_lora_layers, plan_masks, rezero

    cfg = _resolve_config(config)
    if resume and out_dir is None:
        raise ShearkitError("resume=True needs out_dir, the folder whose recovery/ holds the checkpoints.")
    teacher = check_teacher(model, teacher, cfg)
    data_dir = data_dir or cfg.data_dir
    train = build_train_data(tokenizer, cfg.data, mode=cfg.mode, seqlen=cfg.seqlen, split=cfg.split,
                             data_dir=data_dir)
    root = Path(out_dir) / "recovery" if out_dir is not None else None
    refuse_stale(root, resume)

    is_peft = isinstance(model, PeftModel)
    if isinstance(masks, Plan):
        masks = plan_masks(model.get_base_model() if is_peft else model, masks)
    lcfg = None if is_peft else lora_config(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules)
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    set_seed(cfg.seed)
    peft_model = model if is_peft else get_peft_model(model, lcfg)
    kept = mask_lora_layers(peft_model, masks)
    trainer = Trainer(peft_model, tokenizer, train, cfg, callbacks=[_OnStep(on_step)] if on_step else (),
                      root=root, teacher=teacher, data_dir=data_dir, desc="recover")
    history = trainer.fit(resume)
    history["masked_layers"] = len(kept)
    acc = trainer.acc
    if root is not None and acc.is_main_process and cfg.save_adapter:
        from ..io.atomic import atomic_dir

        with atomic_dir(root / "adapter", overwrite=True) as tmp:
            peft_model.save_pretrained(str(tmp))
            if kept:  # the adapters apply only through these masks
                from ..sparsity.apply import save_masks

                save_masks(kept, tmp)
        history["adapter_dir"] = (root / "adapter").relative_to(out_dir).as_posix()
    acc.wait_for_everyone()
    result = peft_model
    if cfg.merge:
        result = peft_model.merge_and_unload()  # masked layers merge their masked update
        rezero(result, kept)
        for n, p in result.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        result.train(was_training)
    history["merged"] = cfg.merge
    acc.free_memory()
    return result, history
