"""Calibration statistics, collected once and reused by every importance function.

One pass over the calibration tokens accumulates, for every linear layer of the decoder blocks:
- the gradient of the language-modelling loss w.r.t. its weight and bias (summed over batches,
  as LLM-Pruner does), when `grads=True`: the weights' own `.grad` is the one accumulator (in the
  weights' dtype), handed over to the statistics without a copy when it is float32 on the CPU;
- the sum over tokens of each input feature's square (`act_sq`, for Wanda-style `|W|·‖X‖`
  scores), recorded by forward hooks, when `act_norms=True`.

Tensors are stored per module path in the `(out, in)` orientation (Conv1D transposed), on CPU
in float32, so scores never depend on the device the pass ran on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.modules import base_module, is_conv1d, unwrap
from ..errors import ShearkitError


@dataclass
class Stats:
    """Per-module calibration statistics (keys: module paths of base layers)."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in)
    bias_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # (in,) sum of x^2 over tokens
    n_tokens: int = 0
    loss: float = float("nan")  # mean calibration loss


def _handover(g: torch.Tensor) -> torch.Tensor:
    """A gradient as Stats keeps it (float32, CPU): the same storage when it already is, so the
    statistics never hold a second gradient-sized copy next to the accumulator."""
    return g.detach().to(device="cpu", dtype=torch.float32)


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Base linear layers (Linear or Conv1D) inside the decoder blocks, by module path."""
    from ..arch import get_adapter

    m = unwrap(model)
    out = {}
    for b in get_adapter(m).blocks():
        for name, mod in b.linear_modules().items():
            base = base_module(mod)
            out[name + (".base_layer" if base is not mod else "")] = base
    return out


def collect_stats(model: nn.Module, tokens: torch.Tensor, *, grads: bool = True, act_norms: bool = False,
                  batch_size: int = 1, desc: str | None = None, checkpointing: bool = False,
                  loss_chunk: int = 0) -> Stats:
    """Run the calibration tokens through `model` once and gather the statistics asked for.

    Args:
        tokens: LongTensor (n, seqlen) of calibration windows.
        grads: accumulate loss gradients of the block weights (needs a backward pass).
        act_norms: accumulate per-input-feature squared activations.
        batch_size: windows per forward pass.
        desc: show a progress bar with that label.
        checkpointing: recompute activations in the backward pass (less memory, same statistics;
            `arch.modules.recompute_activations`).
        loss_chunk: > 0: the output head and loss run on that many tokens at a time
            (`arch.lm_head`: no full-vocabulary logits; same loss).
    """
    from contextlib import nullcontext

    from ..arch.lm_head import causal_lm_loss
    from ..arch.modules import recompute_activations
    from ..progress import progress

    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ShearkitError(f"Calibration tokens must be a (n, seqlen>=2) tensor, got shape {tuple(tokens.shape)}.")
    mods = block_linears(model)
    device = next(model.parameters()).device
    stats = Stats()
    handles = []
    if act_norms:
        def hook(name):
            def fn(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                acc = stats.act_sq.get(name)
                s = x.pow(2).sum(0).cpu()
                stats.act_sq[name] = s if acc is None else acc + s
            return fn
        handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in mods.items()]
    params = [p for mod in mods.values() for p in (mod.weight, getattr(mod, "bias", None)) if p is not None]
    saved = {id(p): (p.requires_grad, p.grad) for p in params}
    all_params = list(model.parameters())
    frozen = {id(p): p.requires_grad for p in all_params}
    was_training = model.training
    total_loss, n_batches = 0.0, 0
    mode = recompute_activations(model) if checkpointing else nullcontext()
    try:
        model.eval()
        if grads:
            for p in all_params:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
                p.grad = None
        ctx = torch.enable_grad() if grads else torch.no_grad()
        with ctx, mode:
            starts = range(0, tokens.shape[0], batch_size)
            for i in progress(starts, desc, unit="batch"):
                ids = tokens[i:i + batch_size].to(device)
                loss = causal_lm_loss(model, ids, loss_chunk)
                if grads:
                    loss.backward()
                total_loss += float(loss.detach())
                n_batches += 1
                stats.n_tokens += ids.numel()
        if grads:  # the accumulated `.grad` itself is handed over (no copy), then detached from the weight
            for name, mod in mods.items():
                g = mod.weight.grad
                if g is None:
                    raise ShearkitError(f"No gradient reached {name}; is the model's forward differentiable?")
                mod.weight.grad = None
                stats.grads[name] = _handover(g.T if is_conv1d(mod) else g)
                b = getattr(mod, "bias", None)
                if b is not None and b.grad is not None:
                    stats.bias_grads[name], b.grad = _handover(b.grad), None
    finally:
        for h in handles:
            h.remove()
        for p in all_params:
            p.requires_grad_(frozen[id(p)])
        for p in params:
            rg, g = saved[id(p)]
            p.requires_grad_(rg)
            p.grad = g
        model.train(was_training)
    stats.loss = total_loss / max(n_batches, 1)
    return stats
