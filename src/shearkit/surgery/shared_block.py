"""Shared blocks (FlexiGPT): a decoder block that computes with another block's weights.

`share_block(model, i, j, rank)` turns block i, in place, into a weight-shared copy of kept block
j: every projection of block i becomes a `SharedLinear` (defined in `io/remote_code.py`, the
modeling file saved beside such models) that uses block j's layer by reference (the same
Parameter objects: one tensor in memory, counted once, saved once under block j), plus its own
low-rank adapter `B A` (`adapter_b` (out, r), `adapter_a` (r, in)) and, on the attention and MLP
outputs (o_proj, down_proj: before the residual add), its own mean-centring output norm with a
learnable scale (`OutputNorm`, initialised small so the block starts as a near-identity
residual contribution). Block i keeps its position (its `layer_idx`, so its own KV-cache slot),
its input RMSNorms and everything else that is not a projection. The adapter is initialised
from the truncated SVD of the full difference W_i - W_j (B = U_r S_r, A = V_r^T, so W_j + B A is
W_i's best rank-r correction), or as plain LoRA (A random, B = 0).

Supported: the llama adapter family (Llama, Mistral, Qwen2, Qwen3, SmolLM; GQA included).
A model with shared blocks is saved with its modeling file (`io/save.py`) and cannot be pruned
again or given peft LoRA (`refuse_shared`): both would write into weights two blocks use.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..importance.shared_base import block_shapes, block_weights, max_rank, truncated_svd
from ..io.remote_code import OutputNorm, SharedLinear

__all__ = ["OutputNorm", "SharedLinear", "share_block", "shared_spec", "has_shared_blocks", "refuse_shared",
           "refuse_split_sharing", "train_only_shared_parts", "shared_parameters"]

FAMILIES = ("llama",)
INITS = ("svd", "lora")
NORM_EPS = 1e-5


def _check_family(model: nn.Module) -> None:
    ad = get_adapter(model)
    if ad.family not in FAMILIES:
        raise ShearkitError(f"Shared blocks are built for the {', '.join(FAMILIES)} family (Llama, Mistral, Qwen2, "
                            f"Qwen3, SmolLM); this model is {ad.family} ('{ad.config.model_type}').")


def share_block(model: nn.Module, i: int, j: int, rank: int, *, init: str = "svd", output_norm: bool = True,
                norm_init: float = 1e-2) -> None:
    """Make block `i` a weight-shared copy of block `j` with rank-`rank` adapters (see the module doc).

    Raises:
        ShearkitError: an unsupported family, i == j, a block out of range or already shared, a base
            that is itself a shared copy, a rank above a projection's rank, or an unknown init.
    """
    m = unwrap(model)
    _check_family(m)
    ad = get_adapter(m)
    n = ad.num_layers
    if not (0 <= i < n and 0 <= j < n) or i == j:
        raise ShearkitError(f"A block shares another block's weights: got block {i} and base {j} (blocks 0..{n - 1}).")
    if init not in INITS:
        raise ShearkitError(f"The adapter init must be one of {', '.join(INITS)}, got '{init}'.")
    for b in (i, j):
        if any(isinstance(mod, SharedLinear) for mod in ad.layers[b].modules()):
            raise ShearkitError(f"Block {b} is already a shared copy; a block shares the weights of a plain block.")
    top, which = max_rank(m)
    if not 1 <= rank <= top:
        raise ShearkitError(f"Adapter rank {rank} is out of range: the smallest projection, {which}, has rank "
                            f"{top}; choose a rank from 1 to {top}.")
    if block_shapes(m, i) != block_shapes(m, j):
        raise ShearkitError(f"Block {i}'s projections differ in shape from block {j}'s (per-layer widths); a block "
                            "can share only the weights of a block of its own shapes.")
    own, base = ad.layers[i], ad.layers[j]
    view = ad.block_view(i)
    outputs = {p.name[len(view.name) + 1:] for p in (view.attn.o, view.mlp.output)}
    targets = block_weights(m, i)
    with torch.no_grad():
        for path, w_i in targets.items():
            src = base.get_submodule(path)
            layer = SharedLinear(src, rank, norm=output_norm and path in outputs, eps=NORM_EPS)
            if init == "svd":
                b_f, a_f = truncated_svd(w_i.float() - src.weight.float(), rank)
                layer.adapter_b.copy_(b_f)
                layer.adapter_a.copy_(a_f)
            else:  # LoRA's init: A as nn.Linear's default, B = 0 (the adapter adds nothing at first)
                nn.init.kaiming_uniform_(layer.adapter_a, a=math.sqrt(5))
            if layer.out_norm is not None:
                layer.out_norm.weight.fill_(norm_init)
            parent_path, _, leaf = path.rpartition(".")
            setattr(own.get_submodule(parent_path) if parent_path else own, leaf, layer)


def _owner_paths(m: nn.Module) -> dict[int, tuple[int, str]]:
    """id(layer) -> (block, block-relative path) for every plain layer of every block."""
    out = {}
    for b, blk in enumerate(get_adapter(m).layers):
        for path, mod in blk.named_modules():
            out[id(mod)] = (b, path)
    return out


def shared_spec(model: nn.Module) -> dict | None:
    """What `io/remote_code.apply_shared_blocks` needs to rebuild the sharing, read from the
    modules (None without shared blocks): {layers_path, norm_eps, blocks: {i: {base, modules}}}."""
    m = unwrap(model)
    ad = get_adapter(m)
    owners = None
    blocks: dict[str, dict] = {}
    for i, blk in enumerate(ad.layers):
        for path, mod in blk.named_modules():
            if not isinstance(mod, SharedLinear):
                continue
            owners = owners if owners is not None else _owner_paths(m)
            where = owners.get(id(mod.shared))
            if where is None or where[1] != path:
                raise ShearkitError(f"Block {i}'s {path} shares a layer that is not the same projection of another "
                                    "block; shearkit cannot save this sharing.")
            entry = blocks.setdefault(str(i), {"base": where[0], "modules": {}})
            if entry["base"] != where[0]:
                raise ShearkitError(f"Block {i} shares layers of two blocks ({entry['base']} and {where[0]}); a "
                                    "shared block has one base.")
            entry["modules"][path] = {"rank": mod.rank, "norm": mod.out_norm is not None}
    if not blocks:
        return None
    return {"layers_path": ad.layers_path, "norm_eps": NORM_EPS, "blocks": blocks}


def has_shared_blocks(model: nn.Module) -> bool:
    """True when some block computes with another block's weights."""
    return any(isinstance(mod, SharedLinear) for mod in unwrap(model).modules())


def refuse_shared(model: nn.Module, what: str) -> None:
    """Refuse `what` (e.g. "pruning") on a model with shared blocks, which it would write through."""
    if has_shared_blocks(model):
        raise ShearkitError(f"This model has weight-shared blocks (FlexiGPT), and {what} would change weights two "
                            "blocks use; start from the model before it was given shared blocks.")


def shared_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that belong to shared copies alone (adapters and output-norm scales), by name."""
    out = {}
    for name, mod in unwrap(model).named_modules():
        if isinstance(mod, SharedLinear):
            out.update({f"{name}.{k}": p for k, p in mod.named_parameters()})
    return out


def refuse_split_sharing() -> None:
    """Refuse training shared blocks under an FSDP launch that wraps modules into separate units
    (`accelerate launch` with `fsdp_auto_wrap_policy` other than NO_WRAP, read from the environment the
    launcher sets and the `Trainer`'s Accelerator reads): a shared weight would sit in its owner
    block's unit only, and a block using it would meet it sharded whenever that unit is not gathered."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").upper()
    if policy != "NO_WRAP":
        raise ShearkitError(f"This model has weight-shared blocks (FlexiGPT, shearkit extend), and FSDP's {policy} "
                            "wrapping would put each shared weight into the shard of the block that owns it only, "
                            "so the blocks computing with it would meet a shard. Launch with "
                            "configs/accelerate/fsdp_shared_blocks.yaml (fsdp_auto_wrap_policy: NO_WRAP) or with "
                            "DDP (configs/accelerate/ddp.yaml).")


@contextmanager
def train_only_shared_parts(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Only the shared copies' adapters and output-norm scales require grad inside the block
    (every other weight of the model, the shared ones included, is frozen); restored afterwards.
    Under an FSDP launch that would split shared weights from their users: refused (`refuse_split_sharing`)."""
    m = unwrap(model)
    trainable = shared_parameters(m)
    if not trainable:
        raise ShearkitError("The model has no shared blocks to train; give it some first (share_block, "
                            "shearkit.extend or the flexigpt method).")
    refuse_split_sharing()
    # the parameters as they are now: a wrapper applied inside (FSDP's flat parameters, DTensors) adds
    # or swaps parameters of `m`, and only these are put back
    before = [(p, p.requires_grad) for p in m.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        yield trainable
    finally:
        for p, flag in before:
            p.requires_grad_(flag)
