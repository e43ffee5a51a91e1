"""Structured masks applied in the forward pass: the model computes exactly as if a plan were applied.

Methods that prune while they train (LoRAPrune) must let training see the pruned model before
any tensor is cut, and must keep changing which structures are pruned. Zeroing weights is not
enough once LoRA is attached (its update would refill them), so the removed structures are
masked where they flow: every removed output row of a layer (and its bias, and its LoRA update)
is zeroed in the layer's output, every removed input column in the layer's input. A masked
model therefore gives the same outputs as the physically sliced one (tested for every family).

Hooks sit on the module that owns the weight; for a peft-wrapped layer that is the wrapper, so
the base weight and its LoRA update are masked together.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch.modules import unwrap
from ..graph.removal import removal_map
from ..plan import Plan


def owner_of(name: str) -> str | None:
    """The hooked module for a tensor part: a peft layer's wrapper, or None for LoRA factors."""
    if ".lora_A." in name or ".lora_B." in name:
        return None
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


class StructuredMasks:
    """Forward hooks that zero what a structured plan removes; `update(plan)` changes the plan,
    `remove()` takes the hooks away (also on leaving a `with` block)."""

    def __init__(self, model: nn.Module, plan: Plan | None = None):
        self.model = unwrap(model)
        self._keep: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: list = []
        if plan is not None:
            self.update(plan)

    def update(self, plan: Plan) -> None:
        """Mask what `plan` removes (and only that), replacing the previous masks."""
        m = self.model
        keep: dict[tuple[str, int], torch.Tensor] = {}
        for (name, dim), idx in removal_map(m, plan).items():
            owner = owner_of(name)
            if owner is None or not idx:
                continue
            mod = m.get_submodule(name)
            size = _size(mod, dim)
            vec = torch.ones(size, dtype=mod.weight.dtype, device=mod.weight.device)
            vec[sorted(idx)] = 0
            keep[(owner, dim)] = vec
        self.set_vectors(keep)

    def set_vectors(self, keep: dict[tuple[str, int], torch.Tensor]) -> None:
        """Scale (module, dim) outputs (dim 0) or inputs (dim 1) by the given vectors, replacing the
        previous masks; the vectors are used by reference, so editing them in place (fractional
        values too: LHSPG's decay) changes the forward at once."""
        m = self.model
        self.remove()
        self._keep = dict(keep)
        for (owner, dim), vec in keep.items():
            mod = m.get_submodule(owner)
            if dim == 0:
                self._handles.append(mod.register_forward_hook(_out_hook(vec)))
            else:
                self._handles.append(mod.register_forward_pre_hook(_in_hook(vec)))

    @property
    def masked(self) -> dict[tuple[str, int], torch.Tensor]:
        """(module, dim) -> keep vector (1 kept, 0 removed) of every masked module."""
        return dict(self._keep)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "StructuredMasks":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def _size(mod: nn.Module, dim: int) -> int:
    from ..arch.modules import module_shape

    out_f, in_f = module_shape(mod)
    return out_f if dim == 0 else in_f


def _out_hook(vec: torch.Tensor):
    def fn(module, args, output):
        return output * vec.to(output.dtype)
    return fn


def _in_hook(vec: torch.Tensor):
    def fn(module, args):
        return (args[0] * vec.to(args[0].dtype), *args[1:])
    return fn
