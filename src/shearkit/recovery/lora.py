"""Which modules get LoRA, and the peft `LoraConfig` for them.

The default targets come from the architecture adapter: every projection of every block
(q/k/v/o and gate/up/down; GPT-2's fused c_attn, c_proj, c_fc), named relative to the block
so peft's suffix matching finds them in every layer whatever its width.
"""
from __future__ import annotations

from torch import nn

from ..arch import get_adapter
from ..arch.modules import is_conv1d
from ..errors import ShearkitError, did_you_mean


def default_targets(model: nn.Module) -> list[str]:
    """Block-relative names of every linear projection of the blocks (e.g. `self_attn.q_proj`)."""
    adapter = get_adapter(model)
    names: set[str] = set()
    for i in range(adapter.num_layers):
        block = adapter.block_view(i)
        for full in block.linear_modules():
            names.add(full[len(block.name) + 1:])
    return sorted(names)


def _targetable(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def matched_modules(model: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """Modules peft will wrap for `targets` (exact names or dotted suffixes); every target must match."""
    mods = _targetable(model)
    found: dict[str, nn.Module] = {}
    for t in targets:
        hits = {n: m for n, m in mods.items() if n == t or n.endswith(f".{t}")}
        if not hits:
            short = sorted({n.split(".")[-1] for n in mods})
            raise ShearkitError(f"LoRA target module '{t}' was not found in the model.{did_you_mean(t, short)} "
                                f"Linear modules end in: {', '.join(short)}.")
        found.update(hits)
    return found


def lora_config(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | None = None):
    """A peft `LoraConfig` for causal-LM recovery on `targets` (default: every block projection).

    GPT-2's `Conv1D` stores weights as (in, out); peft must be told (`fan_in_fan_out=True`) or
    it would merge B @ A transposed.
    """
    from peft import LoraConfig, TaskType

    from ..surgery.shared_block import refuse_shared

    refuse_shared(model, "LoRA recovery (its merge)")
    targets = list(targets) if targets else default_targets(model)
    mods = matched_modules(model, targets)
    kinds = {is_conv1d(m) for m in mods.values()}
    if len(kinds) > 1:
        raise ShearkitError("LoRA targets mix Conv1D and Linear modules; give targets of one kind.")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                      fan_in_fan_out=kinds == {True}, bias="none", task_type=TaskType.CAUSAL_LM)
