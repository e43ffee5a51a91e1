"""Module helpers every stage shares: peft unwrapping, LoRA layers, and the (out, in) weight view.

GPT-2's `Conv1D` stores its weight as (in, out) and a peft LoRA layer wraps its base layer in
`base_layer`; code that slices, scores or masks weights goes through these helpers so that both
look like a plain `nn.Linear`. (`io/remote_code.py` keeps its own copy of the Conv1D test: that
file is saved beside a model and must import nothing of shearkit.)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing of a transformers model on or off (the methods were renamed in 5.x);
    non-reentrant, so gradients reach adapters even when the block inputs need none."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


@contextmanager
def recompute_activations(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` with activation checkpointing and without dropout, then restore it as it was.

    transformers recomputes activations only in train mode, so the model is put in train mode
    with every dropout probability at 0: the outputs stay those of eval mode."""
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)]
    attn = [(m, m.attention_dropout) for m in model.modules()
            if isinstance(getattr(m, "attention_dropout", None), float)]
    was_training = model.training
    new = hasattr(type(model), "is_activation_checkpointing")  # the old name warns in transformers 5
    was_on = bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))
    try:
        for m, _ in dropouts:
            m.p = 0.0
        for m, _ in attn:
            m.attention_dropout = 0.0
        set_activation_checkpointing(model, True)
        model.train()
        yield model
    finally:
        set_activation_checkpointing(model, was_on)
        model.train(was_training)
        for m, p in dropouts:
            m.p = p
        for m, p in attn:
            m.attention_dropout = p
