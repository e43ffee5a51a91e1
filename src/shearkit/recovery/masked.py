"""LoRA that keeps a sparse model's zeros: each adapted layer computes (W + M ⊙ s·BA) x.

A dense LoRA update s·BA fills every pruned weight when it is merged. Here each LoRA layer over
a sparse weight applies its update through the weight's keep-mask M ((out, in), True = kept):
in training, in the evaluations during recovery and in the merge, so the merged model has
exactly the zeros it started with and what was evaluated is what is saved (evaluation computes
with the merged weight itself). In training the masked product is formed in the forward pass
and formed again in the backward pass instead of being stored, so the extra memory is one
weight-sized temporary at a time, not one per layer. The price is compute: per layer and step,
five products of the weight's size with the batch (base and update forward; input gradient
through both; the update's gradient) where plain LoRA needs two.

The masks come from a `Plan` (its masks, or the model's zeros in the layers it sparsified), a
mapping of module name -> keep-mask, or "auto": the zeros of the adapted weights when at least
`AUTO_MIN_ZEROS` of them are zero (a dense model has next to none).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from ..arch.modules import unwrap, weight_view
from ..errors import ShearkitError

AUTO_MIN_ZEROS = 0.01  # "auto": fraction of exact zeros over the adapted weights that marks a sparse model
log = logging.getLogger(__name__)


def _masked_product(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    return (b @ a).masked_fill_(~keep, 0) * scale


class _MaskedLowRank(torch.autograd.Function):
    """y = x (M ⊙ s·BA)ᵀ, with the product recomputed in backward rather than saved."""

    @staticmethod
    def forward(ctx, x, a, b, keep, scale):
        ctx.save_for_backward(x, a, b, keep)
        ctx.scale = scale
        return F.linear(x, _masked_product(a, b, keep, scale))

    @staticmethod
    def backward(ctx, grad):
        x, a, b, keep = ctx.saved_tensors
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ _masked_product(a, b, keep, ctx.scale)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad.reshape(-1, grad.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gd = (g2.T @ x2).masked_fill_(~keep, 0) * ctx.scale  # gradient of the masked update, (out, in)
            ga = b.T @ gd if ctx.needs_input_grad[1] else None
            gb = gd @ a.T if ctx.needs_input_grad[2] else None
        return gx, ga, gb, None, None


def masked_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """The masked LoRA term x (M ⊙ s·BA)ᵀ for x (..., in), A (r, in), B (out, r), M (out, in) bool."""
    return _MaskedLowRank.apply(x, a, b, keep, scale)


class MaskedLoraLinear(LoraLinear):
    """A peft LoRA `Linear` whose update is masked by `shearkit_keep` ((out, in), bool).

    Made from an existing layer by `mask_lora_layers` (never constructed): its forward and
    `get_delta_weight` (and so peft's merge, unmerge and merge_and_unload) apply the mask. The
    mask is a plain attribute, not a buffer, so that DDP does not broadcast it at every step.
    """

    shearkit_keep: torch.Tensor

    def _keep(self, device: torch.device) -> torch.Tensor:
        if self.shearkit_keep.device != device:  # the model was moved after the masks were attached
            self.shearkit_keep = self.shearkit_keep.to(device)
        return self.shearkit_keep

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)  # in the stored layout: (in, out) for GPT-2's Conv1D
        keep = self._keep(delta.device)
        return delta.masked_fill(~(keep.T if self.fan_in_fan_out else keep), 0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ShearkitError("Masked LoRA layers do not take per-example adapter_names; call the model without "
                                "adapter_names (its active adapter then applies to every example).")
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.lora_A]
        base = self.get_base_layer()
        if not torch.is_grad_enabled() and not self.training and not args and not kwargs:
            # evaluation: one product with the merged weight, as the saved model computes it
            weight = (base.weight + sum(self.get_delta_weight(n) for n in active)).to(base.weight.dtype)
            if self.fan_in_fan_out:
                weight = weight.T
            return F.linear(x.to(weight.dtype), weight, base.bias)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in active:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            xa = self.lora_dropout[name](x.to(a.dtype))
            result = result + masked_lora(xa, a, b, self._keep(a.device), self.scaling[name]).to(out_dtype)
        return result


def _weight_oi(layer: LoraLayer) -> torch.Tensor:
    """The base weight of a LoRA layer as (out, in)."""
    return weight_view(layer.get_base_layer())


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """The LoRA layers of a peft model, by their module name in the base model."""
    return {n: m for n, m in unwrap(peft_model).named_modules() if isinstance(m, LoraLayer)}


def plan_masks(model, plan) -> Mapping[str, torch.Tensor] | str:
    """A plan's keep-masks for recovery: its own, else the model's zeros in the layers it sparsified;
    "auto" for plans that are not unstructured (their zeros, if any, are found as for "auto")."""
    if plan.kind != "unstructured":
        return "auto"
    if plan.masks is not None:
        return plan.masks
    from ..sparsity.apply import masks_from_model

    return masks_from_model(model, plan)


@torch.no_grad()
def mask_lora_layers(peft_model, masks: Mapping[str, torch.Tensor] | str | None) -> dict[str, torch.Tensor]:
    """Make the LoRA layers over sparse weights masked (see the module docstring).

    `masks`: a mapping of module name -> (out, in) keep-mask, "auto", or None (no masking).
    Returns the masks applied, by module name (layers whose mask keeps everything are left
    plain). Raises ShearkitError when a weight is non-zero where its mask prunes it: the model
    is then not the one the masks describe.
    """
    if masks is None:
        return {}
    layers = lora_layers(peft_model)
    if isinstance(masks, str):
        if masks != "auto":
            raise ShearkitError(f"masks must be a Plan, a mapping of module name to keep-mask, 'auto' or None; "
                                f"got '{masks}'.")
        keeps = {n: _weight_oi(layer) != 0 for n, layer in layers.items()}
        zeros = sum(int((~k).sum()) for k in keeps.values())
        total = sum(k.numel() for k in keeps.values())
        if not total or zeros / total < AUTO_MIN_ZEROS:
            return {}
        log.info("recover: %.1f%% of the adapted weights are zeros; LoRA is trained under their masks so they "
                 "stay zero (masks=None trains a dense update).", 100 * zeros / total)
    else:
        keeps = {}
        for n, layer in layers.items():
            if n not in masks:
                continue
            keep = masks[n].to(device=_weight_oi(layer).device, dtype=torch.bool)
            w = _weight_oi(layer)
            if tuple(keep.shape) != tuple(w.shape):
                raise ShearkitError(f"The mask of {n} has shape {tuple(keep.shape)}, the weight {tuple(w.shape)}: "
                                    "the masks belong to another model.")
            filled = int((w[~keep] != 0).sum())
            if filled:
                raise ShearkitError(f"{n} has {filled} non-zero weights where its mask prunes them: the model is not "
                                    "the pruned model these masks describe. Apply them first "
                                    "(shearkit.apply_plan(model, plan, check=False)) or pass the pruned model.")
            keeps[n] = keep & (w != 0)  # weights that are zero anyway stay zero too
    applied: dict[str, torch.Tensor] = {}
    for n, keep in keeps.items():
        if bool(keep.all()):
            continue
        layer = layers[n]
        if type(layer) not in (LoraLinear, MaskedLoraLinear):
            raise ShearkitError(f"{n} is a {type(layer).__name__} LoRA layer; masked (sparsity-keeping) LoRA "
                                "supports plain Linear and Conv1D layers.")
        if getattr(layer, "lora_variant", None) or any(getattr(layer, "use_dora", {}).values()):
            raise ShearkitError(f"{n} uses a LoRA variant (e.g. DoRA); masked LoRA supports plain LoRA only.")
        layer.__class__ = MaskedLoraLinear
        layer.shearkit_keep = keep.to(_weight_oi(layer).device)
        applied[n] = keep.cpu()
    return applied


@torch.no_grad()
def rezero(model, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of a merged model again (a no-op after a masked merge, kept as a guarantee)."""
    for n, keep in masks.items():
        mod = model.get_submodule(n)
        w = weight_view(mod)
        w.masked_fill_(~keep.to(w.device), 0)
