"""Surgery: apply a structured plan physically (slice) or as masks (zero), LoRA factors included.

`apply_structured` removes the rows and columns a plan names from every coupled tensor (base
weights, biases, peft `lora_B` rows and `lora_A` columns), deletes removed blocks, and resets
per-layer head counts, widths and `model.config`, so forward, `generate` with a KV cache and
saving all keep working. `mask_structured` zeroes the same structures without changing shapes;
the two give the same outputs (tested for every family), which is how surgery is verified.
"""
from __future__ import annotations


from contextlib import nullcontext

import torch
from torch import nn

from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..io.lazy import loaded_block
from ..graph.groups import check_lora_shapes, expand_part
from ..graph.removal import removal_map
from ..plan import Plan
from .slicing import axis_of, fix_lora_sizes, keep, zero
from .blocks import rebuild_blocks, remove_blocks
from .sync import sync_block_attrs, sync_config

__all__ = ["apply_structured", "mask_structured", "rebuild_blocks", "remove_blocks", "sync_config"]


def apply_structured(model: nn.Module, plan: Plan) -> nn.Module:
    """Slice `model` in place as `plan` says and return it (a peft wrapper stays wrapped); a plan
    of kind `blocks` (whole blocks removed, nothing sliced) goes the same way.

    Raises:
        ShearkitError: the plan does not fit the model (indices out of range, unequal query
            heads per KV head, a layer left without heads or channels, LoRA shapes off).
    """
    from ..arch import get_adapter

    m = unwrap(model)
    ad = get_adapter(m)
    if plan.replaced:
        raise ShearkitError(f"Plan replaces blocks ({plan.replaced}) by shared copies whose adapters were trained "
                            "in its run; a plan does not hold them. Load the model that run saved instead.")
    check_lora_shapes(m)
    rem = removal_map(m, plan)  # validates before anything changes
    tied = ad.tied_embeddings
    # the cuts block by block, each block in memory while it is cut (a lazy model's read and written back)
    owner = {id(mod): i for i, block in enumerate(ad.layers) for mod in block.modules()}
    cuts: dict[int | None, list[tuple[nn.Module, int, set]]] = {}
    for (name, dim), idx in rem.items():
        if idx:
            mod = m.get_submodule(name)
            cuts.setdefault(owner.get(id(mod)), []).append((mod, dim, idx))
    for i, entries in cuts.items():
        with nullcontext() if i is None else loaded_block(m, ad.layers[i], write=True):
            for mod, dim, idx in entries:
                size = mod.weight.shape[axis_of(mod, dim)]
                keep(mod, dim, torch.tensor(sorted(set(range(size)) - idx), dtype=torch.long))
    fix_lora_sizes(m)
    sync_block_attrs(m)
    remove_blocks(m, plan.blocks)
    if tied:
        ad.lm_head.weight = ad.embeddings()[0].weight
    sync_config(m)
    return model


def mask_structured(model: nn.Module, plan: Plan) -> nn.Module:
    """Zero in place what `plan` removes, keeping shapes; removed blocks get zero output
    projections (a pre-norm block then adds nothing to the residual stream)."""
    from ..arch import get_adapter

    m = unwrap(model)
    rem = removal_map(m, plan)
    ad = get_adapter(m)
    for i in plan.blocks:
        b = ad.block_view(i)
        for p in (b.attn.o, b.mlp.output):
            full = torch.arange(p.out_features)[:, None]
            for part in expand_part(m, p.name, 0, full):
                rem.setdefault((part.module, 0), set()).update(range(p.out_features))
    for (name, dim), idx in rem.items():
        if idx:
            zero(m.get_submodule(name), dim, torch.tensor(sorted(idx), dtype=torch.long))
    return model

