"""LoRA-guided importance (LoRAPrune, Zhang et al. 2023): group scores from the LoRA factors and
their gradients alone, never the frozen weights' gradient.

One plain SGD step of learning rate 1 on the factors changes `B A` by `-(gB A + B gA - gB gA)`;
LoRAPrune reads that change as a surrogate of the weight gradient,

    G_hat = gB @ A + B @ gA - gB @ gA           (out, in), gB = dL/dB, gA = dL/dA,

and scores each weight by `|G_hat * W_eff|` (`W_eff = W + s B A`, the weight the forward uses;
the official code's absolute value). `G_hat` is formed for one module at a time and reduced to
group sums at once, so scoring holds one weight-sized temporary, not a gradient per weight.

Per group set (the KV groups or the MLP channels of a layer), each module's contribution is
divided by its own L2 norm before the contributions are added (`normalize=True`, the official
per-module normalisation), so a group's score does not depend on which module happens to have large
values. Normalised scores rank the groups of one set; they are not comparable between sets of
different sizes (3 KV groups against 1536 channels), so ranking across kinds and layers (global
allocation) takes the plain sums (`normalize=False`), first-order estimates of the loss change in
one unit for every group.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..errors import ShearkitError
from ..arch.modules import is_lora_layer, unwrap, weight_view
from ..graph.groups import GroupSet

EPS = 1e-8


def lora_factors(layer: nn.Module, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (r, in), B (out, r), scaling) of one peft LoRA layer's adapter."""
    if not is_lora_layer(layer) or adapter not in layer.lora_A:
        raise ShearkitError(f"{type(layer).__name__} carries no LoRA adapter '{adapter}'; LoRA-guided importance "
                            "needs every scored module wrapped by peft LoRA.")
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, float(layer.scaling[adapter])


def lora_of(model: nn.Module, base_name: str, adapter: str = "default"):
    """(A, B, scaling) of the LoRA layer wrapping base module `base_name` (`...proj.base_layer`), or
    None when that module carries no LoRA adapter."""
    if not base_name.endswith(".base_layer"):
        return None
    layer = model.get_submodule(base_name[: -len(".base_layer")])
    return lora_factors(layer, adapter) if is_lora_layer(layer) and adapter in layer.lora_A else None


def g_hat(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """LoRAPrune's surrogate weight gradient of one LoRA layer, (out, in), float32."""
    a, b, _ = lora_factors(layer, adapter)
    if a.grad is None or b.grad is None:
        raise ShearkitError("The LoRA factors have no gradient; compute the loss's backward pass before scoring.")
    ga, gb = a.grad.detach().float(), b.grad.detach().float()
    a, b = a.detach().float(), b.detach().float()
    return gb @ a + b @ ga - gb @ ga


def effective_weight(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """`W + s B A` as (out, in), float32: the weight the layer computes with."""
    a, b, s = lora_factors(layer, adapter)
    return weight_view(layer.base_layer).detach().float() + s * (b.detach().float() @ a.detach().float())


def importance_map(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """`|G_hat * W_eff|` of one LoRA layer, (out, in)."""
    return (g_hat(layer, adapter) * effective_weight(layer, adapter)).abs_()


def lora_group_scores(model: nn.Module, sets: dict[tuple[str, int], GroupSet], adapter: str = "default",
                      normalize: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """One score per group for every group set (keyed (kind, layer)), from the current LoRA gradients.

    Each module's importance map is built once and reduced for every part that reads it, then
    freed; each part's vector is L2-normalised before the parts of a set are added.
    """
    m = unwrap(model)
    by_module: dict[str, list[tuple[tuple[str, int], object]]] = defaultdict(list)
    for key, gs in sets.items():
        for part in gs.base_parts():
            if not part.module.endswith(".base_layer"):
                raise ShearkitError(f"{part.module} is not wrapped by LoRA; LoRA-guided importance needs LoRA on "
                                    "every projection of the pruned layers (all seven for Llama): leave "
                                    "prune.target_modules unset, or list every projection in it.")
            by_module[part.module[: -len(".base_layer")]].append((key, part))
    out: dict[tuple[str, int], torch.Tensor] = {k: torch.zeros(gs.size) for k, gs in sets.items()}
    for name, parts in by_module.items():
        imp = importance_map(m.get_submodule(name), adapter)
        for key, part in parts:
            idx = part.index.to(imp.device)
            if part.dim == 0:
                v = imp[idx].reshape(idx.shape[0], -1).sum(1)
            else:
                v = imp[:, idx].sum(dim=(0, 2))
            out[key] += (v / (v.norm() + EPS) if normalize else v).cpu()
        del imp
    return out
