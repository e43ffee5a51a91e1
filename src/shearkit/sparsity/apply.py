"""An unstructured plan's keep-masks: held bit-packed, saved beside plan.json, re-applied.

A plan's JSON records each layer's sparsity and pattern; the masks themselves (one bit per
weight, 1/16 the size of a bf16 weight) are a declared field of the plan (`Plan.masks`), saved
beside plan.json (`masks.safetensors` in a run directory, `sparsity/masks.safetensors` in a
model directory, where weight loaders that read every top-level `*.safetensors` do not see
them) so the exact zeros can be written into the base model again, and kept through recovery.
A plan whose masks file is absent gets them from the pruned model's zeros (`masks_from_model`).
Masks are kept in the (out, in) orientation of `LinearRef.weight`, keyed by the full module
name, and packed along the input axis with `numpy.packbits`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..arch import get_adapter
from ..errors import ShearkitError
from .layers import LinearRef, block_linears

MASKS_FILE = "masks.safetensors"
MODEL_MASKS_FILE = f"sparsity/{MASKS_FILE}"  # in a saved model directory, relative to its plan.json
log = logging.getLogger(__name__)


class PackedMasks(Mapping):
    """Keep-masks held bit-packed in memory (1 bit per weight), unpacked on access.

    The sparsity methods return one as their plan's `masks`, so that a run can save them and
    keep the zeros through recovery without holding a byte per weight.
    """

    def __init__(self, packed: dict[str, torch.Tensor] | None = None, shapes: dict[str, list[int]] | None = None):
        self._packed: dict[str, torch.Tensor] = dict(packed or {})
        self._shapes: dict[str, list[int]] = dict(shapes or {})

    def add(self, name: str, keep: torch.Tensor) -> None:
        a = keep.detach().to("cpu", torch.bool).numpy()
        self._packed[name] = torch.from_numpy(np.ascontiguousarray(np.packbits(a, axis=-1)))
        self._shapes[name] = list(a.shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self._shapes[name]
        bits = np.unpackbits(self._packed[name].numpy(), axis=-1, count=shape[-1])
        return torch.from_numpy(bits.astype(bool)).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return dict(self._packed), {"format": "shearkit-packed-masks", "shapes": json.dumps(self._shapes)}


def masks_from_model(model, plan) -> PackedMasks:
    """The keep-masks (weight != 0) of every layer a plan sparsified, by full module name."""
    out = PackedMasks()
    for ref in each_plan_linear(model, plan):
        out.add(ref.name, ref.weight.detach() != 0)
    return out


def each_plan_linear(model, plan) -> Iterator[LinearRef]:
    """`plan_linears` one block at a time, each block in memory while its layers are looked at (a lazy
    model's read from disk), so that reading every pruned weight never holds more than one block."""
    from ..io.lazy import loaded_block

    refs = plan_linears(model, plan)  # every layer checked before any is read
    ad = get_adapter(model)
    for li in sorted({int(li) for li in plan.layers}):
        block = ad.layers[li]
        with loaded_block(model, block):
            inside = {id(m) for m in block.modules()}
            yield from (ref for ref in refs if id(ref.module) in inside)


def plan_linears(model, plan) -> list[LinearRef]:
    """The weight matrices an unstructured plan sparsified, found in `model`."""
    ad = get_adapter(model)
    refs: list[LinearRef] = []
    for li, entry in plan.layers.items():
        if int(li) >= ad.num_layers:
            raise ShearkitError(f"The plan sparsified layer {li}, but the model has {ad.num_layers} layers; "
                                "it is not the plan's model.")
        found = block_linears(ad.block_view(int(li)))
        for rel in entry.get("sparsity", {}):
            if rel not in found:
                raise ShearkitError(f"The plan sparsified layer {li} '{rel}', which the model does not have; "
                                    "it is not the plan's model.")
            refs.append(found[rel])
    return refs


def measured_sparsity(model, plan) -> float:
    """Fraction of exact zeros in the weights an unstructured plan sparsified, as the model is now."""
    zeros = total = 0
    for ref in each_plan_linear(model, plan):
        zeros += int((ref.weight == 0).sum())
        total += ref.weight.numel()
    return zeros / max(total, 1)


@torch.no_grad()
def check_plan_zeros(model, plan) -> None:
    """Refuse a model that lost zeros its unstructured plan's masks record (e.g. to a dense merge of
    LoRA), so that a saved plan.json and model card never claim a sparsity the weights lack."""
    if plan.kind != "unstructured":
        return
    if plan.masks is None:  # no masks to compare with: at least the count of zeros must hold
        now = measured_sparsity(model, plan)
        if now < plan.ratio_achieved - 1e-9:
            raise ShearkitError(f"The layers this plan sparsified are {now:.4f} zeros, not the {plan.ratio_achieved:.4f} "
                                "it records: the model lost its sparsity (was it recovered without its masks?). "
                                "Save it without the plan, or prune it again.")
        return
    for ref in each_plan_linear(model, plan):
        keep = plan.masks.get(ref.name)
        if keep is None:
            continue
        lost = int((ref.weight[~keep.to(ref.weight.device)] != 0).sum())
        if lost:
            raise ShearkitError(
                f"{ref.name} has {lost} non-zero weights where its plan pruned them: the model no longer has "
                f"the sparsity the plan records (was it recovered without its masks?). Re-apply them with "
                "shearkit.apply_plan(model, plan, check=False), or save the model without the plan.")


def pack_masks(masks: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Bit-pack boolean masks: (tensors of uint8, metadata holding the original shapes)."""
    if isinstance(masks, PackedMasks):
        return masks.packed()
    packed, shapes = {}, {}
    for name, m in masks.items():
        a = m.detach().to("cpu", torch.bool).numpy()
        packed[name] = torch.from_numpy(np.ascontiguousarray(np.packbits(a, axis=-1)))
        shapes[name] = list(a.shape)
    return packed, {"format": "shearkit-packed-masks", "shapes": json.dumps(shapes)}


def unpack_masks(packed: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of `pack_masks`."""
    shapes = json.loads(metadata["shapes"])
    out = {}
    for name, t in packed.items():
        shape = shapes[name]
        bits = np.unpackbits(t.numpy(), axis=-1, count=shape[-1])
        out[name] = torch.from_numpy(bits.astype(bool)).reshape(shape)
    return out


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write masks to `path` (a file, or a directory that gets `masks.safetensors`) atomically."""
    from safetensors.torch import save_file

    from ..io.atomic import atomic_file

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / MASKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    packed, meta = pack_masks(masks)
    with atomic_file(path) as tmp:
        save_file(packed, str(tmp), metadata=meta)
    return path


def load_masks(path: str | os.PathLike) -> PackedMasks:
    """Read masks written by `save_masks` (a file or the run directory holding it), kept bit-packed."""
    from safetensors import safe_open

    from ..io.weights import check_safetensors

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.exists():
        raise ShearkitError(f"Mask file not found: {path}. Unstructured plans are re-applied from the "
                            f"{MASKS_FILE} written beside plan.json.")
    check_safetensors(path, "mask file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "shearkit-packed-masks":
            raise ShearkitError(f"{path} is not a shearkit mask file; give the masks file shearkit wrote beside "
                                "the plan's plan.json.")
        packed = {k: f.get_tensor(k) for k in f.keys()}
    try:
        shapes = json.loads(meta.get("shapes", ""))
    except (json.JSONDecodeError, RecursionError):
        shapes = None
    if not _shapes_match(packed, shapes):
        raise ShearkitError(f"{path} is damaged: its record of mask shapes is missing or does not match the masks "
                            "it holds. Re-save the plan, or prune again.")
    return PackedMasks(packed, shapes)


def _shapes_match(packed: dict[str, torch.Tensor], shapes: Any) -> bool:
    """True when `shapes` gives each packed mask a shape that its bit-packed tensor holds."""
    if not isinstance(shapes, dict) or set(shapes) != set(packed):
        return False
    for name, t in packed.items():
        shape = shapes[name]
        if not (isinstance(shape, list) and len(shape) == t.dim() >= 1 and t.dtype == torch.uint8
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                and list(t.shape) == [*shape[:-1], (shape[-1] + 7) // 8]):
            return False
    return True


@torch.no_grad()
def apply_masks(model, plan, masks: Mapping[str, torch.Tensor] | str | os.PathLike | None = None) -> None:
    """Zero the weights a plan pruned, from its masks (the plan's own by default, a mapping, or a path).

    For plans whose method also changed the kept weights (SparseGPT) the masks reproduce the
    sparsity pattern, not the updated weights (right for re-zeroing after recovery; to get
    the pruned model itself, load the saved one). That is logged.
    """
    if masks is None:
        masks = plan.masks
    if masks is None:
        raise ShearkitError("This unstructured plan carries no masks (the masks file saved beside its plan.json "
                            "is missing); pass masks=load_masks(path) or load the plan from its run directory.")
    if not isinstance(masks, Mapping):
        masks = load_masks(masks)
    if plan.extra.get("weights_updated"):
        log.info("Plan '%s' also updated the kept weights; its masks restore the zeros, not those weights.",
                 plan.method)
    ad = get_adapter(model)
    plan_linears(model, plan)  # a layer or projection the model lacks is refused before any weight is zeroed
    for li, entry in plan.layers.items():
        refs = block_linears(ad.block_view(int(li)))
        for rel in entry.get("sparsity", {}):
            ref = refs.get(rel)
            if ref is None or ref.name not in masks:
                raise ShearkitError(f"No mask for layer {li} '{rel}' in the mask file; it does not belong to this plan.")
            keep = masks[ref.name]
            if tuple(keep.shape) != tuple(ref.weight.shape):
                raise ShearkitError(f"Mask for {ref.name} has shape {tuple(keep.shape)} but the weight is "
                                    f"{tuple(ref.weight.shape)}; the model is not the plan's base.")
            ref.apply_mask(keep)
