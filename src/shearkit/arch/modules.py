"""Module helpers every stage shares: peft unwrapping, LoRA layers, and the (out, in) weight view.

GPT-2's `Conv1D` stores its weight as (in, out) and a peft LoRA layer wraps its base layer in
`base_layer`; code that slices, scores or masks weights goes through these helpers so that both
look like a plain `nn.Linear`. (`io/remote_code.py` keeps its own copy of the Conv1D test: that
file is saved beside a model and must import nothing of shearkit.)
"""
from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_lora_layer(module: nn.Module) -> bool:
    """True for a peft LoRA layer (it holds the original layer in `base_layer`)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def base_module(module: nn.Module) -> nn.Module:
    """The layer a LoRA layer wraps, or the module itself."""
    return module.base_layer if is_lora_layer(module) else module


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' `Conv1D` (GPT-2), whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer's weight; (size, 0) for a 1-D weight (norms); (dim, num) for embeddings."""
    w = module.weight
    if w.dim() == 1:
        return w.shape[0], 0
    if is_conv1d(module) or isinstance(module, nn.Embedding):
        return w.shape[1], w.shape[0]  # an embedding's hidden channels are its "outputs"
    return w.shape[0], w.shape[1]


def weight_view(module: nn.Module) -> torch.Tensor:
    """A layer's weight as an (out, in) view (Conv1D transposed), sharing storage with it."""
    return module.weight.T if is_conv1d(module) else module.weight
