"""Keep or zero chosen rows/columns of one module's tensors, whatever its type.

Indices address the weight seen as `(out, in)`: `dim=0` rows (plus the bias), `dim=1` columns.
Linear stores `(out, in)`, GPT-2's Conv1D stores `(in, out)` (so its axes are swapped here),
an Embedding's "outputs" are its columns (the hidden channels) and a norm has 1-D tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch.modules import is_conv1d, is_lora_layer, module_shape


def axis_of(module: nn.Module, dim: int) -> int:
    """The axis of `module.weight` that holds the (out, in)-view dimension `dim`."""
    w = module.weight
    if w.dim() == 1:
        return 0
    if is_conv1d(module) or isinstance(module, nn.Embedding):
        return 1 - dim
    return dim


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    new = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    setattr(module, name, new)


def keep(module: nn.Module, dim: int, kept: torch.Tensor) -> None:
    """Keep only `kept` indices of dimension `dim` (the bias follows output rows)."""
    kept = kept.to(module.weight.device)
    with torch.no_grad():
        _replace(module, "weight", module.weight.index_select(axis_of(module, dim), kept))
        bias = getattr(module, "bias", None)
        if dim == 0 and isinstance(bias, torch.Tensor):
            _replace(module, "bias", bias.index_select(0, kept))
    _fix_size_attrs(module)


def zero(module: nn.Module, dim: int, removed: torch.Tensor) -> None:
    """Set the `removed` indices of dimension `dim` to zero (the bias too for output rows)."""
    removed = removed.to(module.weight.device)
    with torch.no_grad():
        module.weight.index_fill_(axis_of(module, dim), removed, 0.0)
        bias = getattr(module, "bias", None)
        if dim == 0 and isinstance(bias, torch.Tensor):
            bias.index_fill_(0, removed, 0.0)


def _fix_size_attrs(module: nn.Module) -> None:
    """Keep the size attributes torch/transformers read in line with the new weight."""
    w = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape
    elif is_conv1d(module):
        module.nx, module.nf = w.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = w.shape[1]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (w.shape[0],)
    elif w.dim() == 1 and hasattr(module, "hidden_size"):
        module.hidden_size = w.shape[0]


def fix_lora_sizes(model: nn.Module) -> None:
    """peft LoRA layers cache in/out sizes; refresh them from their base layer."""
    for mod in model.modules():
        if is_lora_layer(mod) and hasattr(mod, "in_features"):
            mod.out_features, mod.in_features = module_shape(mod.base_layer)
