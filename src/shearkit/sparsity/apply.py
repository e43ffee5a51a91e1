"""Re-applying an unstructured plan: masks in a bit-packed sidecar, `masks.safetensors`.

A plan's JSON records each layer's sparsity and pattern; the masks themselves (one bit per
weight, 1/16 the size of a bf16 weight) go beside it so the exact zeros can be written into the
base model again. Masks are kept in the (out, in) orientation of `LinearRef.weight`, keyed by
the full module name, and packed along the input axis with `numpy.packbits`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..arch import get_adapter
from ..errors import ShearkitError
from .layers import block_linears

MASKS_FILE = "masks.safetensors"
log = logging.getLogger(__name__)


class PackedMasks(Mapping):
    """Keep-masks held bit-packed in memory (1 bit per weight), unpacked on access.

    Methods attach one to their plan as `plan._masks` so that a run can save the sidecar and
    re-apply the zeros after recovery without holding a byte per weight.
    """

    def __init__(self) -> None:
        self._packed: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, list[int]] = {}

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


def masks_from_model(model, plan) -> dict[str, torch.Tensor]:
    """The keep-masks (weight != 0) of every layer a plan sparsified, by full module name."""
    ad = get_adapter(model)
    out: dict[str, torch.Tensor] = {}
    for li, entry in plan.layers.items():
        refs = block_linears(ad.block_view(int(li)))
        for rel in entry.get("sparsity", {}):
            ref = refs[rel]
            out[ref.name] = (ref.weight.detach() != 0).cpu()
    return out


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


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read masks written by `save_masks` (a file or the run directory holding it)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.exists():
        raise ShearkitError(f"Mask file not found: {path}. Unstructured plans are re-applied from the "
                            f"{MASKS_FILE} written beside plan.json.")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "shearkit-packed-masks":
            raise ShearkitError(f"{path} is not a shearkit mask file.")
        packed = {k: f.get_tensor(k) for k in f.keys()}
    return unpack_masks(packed, meta)


@torch.no_grad()
def apply_masks(model, plan, masks: Mapping[str, torch.Tensor] | str | os.PathLike | None) -> None:
    """Zero the weights a plan pruned, from its masks (a mapping or a path to the sidecar).

    For plans whose method also changed the kept weights (SparseGPT) the masks reproduce the
    sparsity pattern, not the updated weights (right for re-zeroing after recovery; to get
    the pruned model itself, load the saved one). That is logged.
    """
    if masks is None:
        raise ShearkitError("An unstructured plan is applied from its masks: pass masks=load_masks(run_dir) "
                            f"(the {MASKS_FILE} saved beside plan.json).")
    if not isinstance(masks, Mapping):
        masks = load_masks(masks)
    if plan.extra.get("weights_updated"):
        log.info("Plan '%s' also updated the kept weights; its masks restore the zeros, not those weights.",
                 plan.method)
    ad = get_adapter(model)
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
