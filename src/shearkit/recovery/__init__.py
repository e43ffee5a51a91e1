"""LoRA recovery of pruned models: `recover(model, tok, RecoverConfig(...))` and the `recover:` recipe section."""
from __future__ import annotations

from typing import Any

from ..recipe import build_config, register_section
from .config import RecoverConfig


def _resolve_section(data: dict) -> RecoverConfig:
    return build_config(RecoverConfig, data, "recover")


register_section("recover", _resolve_section)


def recover(*args: Any, **kwargs: Any):
    """Fine-tune LoRA adapters to recover a pruned model, then merge them.

    Lazy wrapper (this package is imported when recipes are parsed, which must not load torch);
    the arguments are documented on `shearkit.recovery.trainer.recover`.
    """
    from .trainer import recover as _recover

    return _recover(*args, **kwargs)


__all__ = ["RecoverConfig", "recover"]
