"""Dependency groups: the minimally removable structures of a decoder, derived from its adapter.

A *group* is a set of coupled slices that must be removed together so that the model still
computes: an MLP channel is a row of gate and up (or of fc1 and its bias) plus a column of down
(or fc2); a query head is `head_dim` rows of q (and its bias) plus `head_dim` columns of o; a
KV group is one KV head's rows of k and v plus every query head that reads it; a hidden channel
is a column of every weight that reads the residual stream, a row of every weight that writes
it, an entry of every norm and a column of the embeddings and lm_head. Heads are never split
(RoPE pairs dimensions inside a head).

Slices are named by module path in the *unwrapped* model (peft's wrapper removed) and address
the weight seen as `(out, in)` (`dim=0`: output rows and the bias, `dim=1`: input columns), so
GPT-2's transposed Conv1D and fused q/k/v look like any other layer. A module wrapped by peft
LoRA contributes its `base_layer` plus its LoRA factors: `lora_B` rows with output slices and
`lora_A` columns with input slices (`lora=True`), so a model can be pruned mid-training.

The groups of one kind in one layer are kept together as a `GroupSet`, whose index tables
(`(n_groups, k)` per part) let importance functions score every group in one tensor operation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..arch.modules import is_lora_layer, module_shape, unwrap
from ..errors import ShearkitError

KINDS = ("mlp_channel", "query_head", "kv_group", "block", "hidden_channel")


@dataclass(frozen=True)
class Slice:
    """Indices of one tensor dimension of one module that belong to a group."""

    module: str  # module path in the unwrapped model
    dim: int  # 0: output rows of the (out, in) weight (and the bias); 1: input columns
    indices: tuple[int, ...]
    lora: bool = False  # a LoRA factor (not counted as a base parameter)


@dataclass(frozen=True)
class Group:
    """One minimally removable structure."""

    kind: str
    layer: int | None  # None for network-wide groups (hidden channels)
    index: int  # head, KV head, channel or block number
    slices: tuple[Slice, ...]


@dataclass
class Part:
    """One tensor dimension shared by all groups of a GroupSet: group `j` owns `index[j]`."""

    module: str
    dim: int
    index: torch.Tensor  # LongTensor (n_groups, k)
    lora: bool = False


@dataclass
class GroupSet:
    """All groups of one kind in one layer (e.g. the 1536 MLP channels of layer 3)."""

    kind: str
    layer: int | None
    size: int
    parts: list[Part] = field(default_factory=list)

    def __len__(self) -> int:
        return self.size

    def group(self, j: int) -> Group:
        """Group `j` as an explicit object."""
        if not 0 <= j < self.size:
            raise IndexError(f"{self.kind} group {j} out of range (layer {self.layer} has {self.size}).")
        return Group(self.kind, self.layer, j, tuple(
            Slice(p.module, p.dim, tuple(int(i) for i in p.index[j]), p.lora) for p in self.parts))

    def __iter__(self) -> Iterator[Group]:
        return (self.group(j) for j in range(self.size))

    def base_parts(self) -> list[Part]:
        return [p for p in self.parts if not p.lora]

    def lora_parts(self) -> list[Part]:
        return [p for p in self.parts if p.lora]

    def param_counts(self, model: nn.Module, lora: bool = False) -> torch.Tensor:
        """Parameters each group holds: base weights and biases, or (`lora=True`) the LoRA factor
        entries that go with them (rank x slice: B rows, A columns; the rank is never pruned)."""
        n = torch.zeros(self.size, dtype=torch.long)
        for p in (self.lora_parts() if lora else self.base_parts()):
            mod = model.get_submodule(p.module)
            out_f, in_f = module_shape(mod)
            k = p.index.shape[1]
            if p.dim == 0:
                per = in_f + (1 if _bias(mod) is not None else 0)
                if in_f == 0:  # a 1-D tensor (norm weight)
                    per = 1 + (1 if _bias(mod) is not None else 0)
            else:
                per = out_f
            n += k * per
        return n


def _bias(module: nn.Module):
    return getattr(module, "bias", None)


def check_lora_shapes(model: nn.Module) -> None:
    """Refuse LoRA factors whose shapes do not fit their base layer (e.g. an adapter trained on
    the dense model loaded onto a pruned one)."""
    m = unwrap(model)
    for name, mod in m.named_modules():
        if not is_lora_layer(mod) or not isinstance(getattr(mod, "lora_A", None), nn.ModuleDict):
            continue
        out_f, in_f = module_shape(mod.base_layer)
        for a in mod.lora_A:
            if a not in mod.lora_B:
                continue
            ra, ia = mod.lora_A[a].weight.shape
            ob, rb = mod.lora_B[a].weight.shape
            if ia != in_f or ob != out_f or ra != rb:
                raise ShearkitError(
                    f"LoRA adapter '{a}' on {name} has shapes A {tuple(mod.lora_A[a].weight.shape)}, "
                    f"B {tuple(mod.lora_B[a].weight.shape)} but the layer is ({out_f} out, {in_f} in). The adapter "
                    "was made for a model of other widths: load it onto the model it was trained with, or prune "
                    "the adapter together with the model (shearkit slices LoRA factors with their layers).")


def expand_part(model: nn.Module, name: str, dim: int, index: torch.Tensor) -> list[Part]:
    """A part on module `name`, plus the LoRA factors attached to it when peft wraps it."""
    mod = model.get_submodule(name)
    if not is_lora_layer(mod):
        return [Part(name, dim, index)]
    parts = [Part(f"{name}.base_layer", dim, index)]
    if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict):
        for a in mod.lora_A:
            if dim == 0 and a in mod.lora_B:
                parts.append(Part(f"{name}.lora_B.{a}", 0, index, lora=True))
            elif dim == 1:
                parts.append(Part(f"{name}.lora_A.{a}", 1, index, lora=True))
    if getattr(mod, "lora_embedding_A", None):
        raise ShearkitError(f"{name} carries an embedding LoRA; merge it before pruning hidden channels.")
    if getattr(mod, "lora_magnitude_vector", None):
        raise ShearkitError(f"{name} carries a DoRA magnitude vector, which shearkit cannot slice; use plain LoRA.")
    return parts


def _rows(offset: int, starts: torch.Tensor, width: int) -> torch.Tensor:
    """Index table (len(starts), width): rows offset+s .. offset+s+width-1 for each start s."""
    return offset + starts[:, None] + torch.arange(width)[None, :]


# -- builders ---------------------------------------------------------------------------------

def mlp_channels(model: nn.Module, layer: int) -> GroupSet:
    """MLP channel groups of one layer: rows of every input projection, a column of the output."""
    from ..arch import get_adapter

    m = unwrap(model)
    b = get_adapter(m).block_view(layer)
    width = b.mlp.width
    idx = torch.arange(width)[:, None]
    parts: list[Part] = []
    for p in b.mlp.inputs:
        parts += expand_part(m, p.name, 0, idx + p.out_offset)
    parts += expand_part(m, b.mlp.output.name, 1, idx)
    return GroupSet("mlp_channel", layer, width, parts)


def query_heads(model: nn.Module, layer: int) -> GroupSet:
    """Query-head groups of one layer: `head_dim` rows of q, `head_dim` columns of o.

    Removing query heads alone is valid only when every KV head keeps the same number of query
    heads (the planner and surgery check this). Without GQA a head is a `kv_groups` group."""
    from ..arch import get_adapter

    m = unwrap(model)
    a = get_adapter(m).block_view(layer).attn
    hd = a.head_dim
    starts = torch.arange(a.num_heads) * hd
    parts = expand_part(m, a.q.name, 0, _rows(a.q.out_offset, starts, hd))
    parts += expand_part(m, a.o.name, 1, _rows(0, starts, hd))
    return GroupSet("query_head", layer, a.num_heads, parts)


def kv_groups(model: nn.Module, layer: int) -> GroupSet:
    """KV groups of one layer: one KV head's rows of k and v plus the query heads that read it
    (query head h reads KV head h // group_size, as in transformers' `repeat_kv`)."""
    from ..arch import get_adapter

    m = unwrap(model)
    a = get_adapter(m).block_view(layer).attn
    hd, g = a.head_dim, a.group_size
    kv_starts = torch.arange(a.num_kv_heads) * hd
    q_starts = torch.arange(a.num_kv_heads) * g * hd
    parts: list[Part] = []
    parts += expand_part(m, a.q.name, 0, _rows(a.q.out_offset, q_starts, g * hd))
    parts += expand_part(m, a.k.name, 0, _rows(a.k.out_offset, kv_starts, hd))
    parts += expand_part(m, a.v.name, 0, _rows(a.v.out_offset, kv_starts, hd))
    parts += expand_part(m, a.o.name, 1, _rows(0, q_starts, g * hd))
    return GroupSet("kv_group", layer, a.num_kv_heads, parts)


def hidden_channels(model: nn.Module) -> GroupSet:
    """Hidden-channel groups across the whole network: embedding columns, every input column
    that reads the residual stream, every output row that writes it, every norm, lm_head."""
    from ..arch import get_adapter

    m = unwrap(model)
    ad = get_adapter(m)
    if ad.family != "llama":
        raise ShearkitError(f"Hidden-channel pruning is supported for the llama family only, not '{ad.family}' "
                            "(its attention derives head_dim from the hidden size).")
    d = ad.hidden_size
    idx = torch.arange(d)[:, None]
    parts: list[Part] = []
    names = {mod: n for n, mod in m.named_modules()}
    for emb in ad.embeddings():
        parts += expand_part(m, names[emb], 0, idx)
    for b in ad.blocks():
        for norm in b.norms:
            parts.append(Part(names[norm], 0, idx))
        for p in [b.attn.q, b.attn.k, b.attn.v, *b.mlp.inputs]:
            parts += expand_part(m, p.name, 1, idx)
        parts += expand_part(m, b.attn.o.name, 0, idx)
        parts += expand_part(m, b.mlp.output.name, 0, idx)
    if ad.final_norm is not None:
        parts.append(Part(names[ad.final_norm], 0, idx))
    if not ad.tied_embeddings:
        parts += expand_part(m, ad.lm_head_path, 1, idx)
    return GroupSet("hidden_channel", None, d, parts)


def blocks(model: nn.Module) -> GroupSet:
    """Whole-block groups: group `i` is decoder block `i` (every parameter inside it)."""
    from ..arch import get_adapter

    ad = get_adapter(unwrap(model))
    return GroupSet("block", None, ad.num_layers, [])


def layer_groups(model: nn.Module, layer: int, attn_unit: str = "kv_group") -> dict[str, GroupSet]:
    """The group sets of one layer: `mlp_channel`, `kv_group` and (under GQA) `query_head`."""
    out = {"mlp_channel": mlp_channels(model, layer), "kv_group": kv_groups(model, layer)}
    if attn_unit == "query_heads":
        out["query_head"] = query_heads(model, layer)
    return out


def base_block_params(model: nn.Module) -> int:
    """Parameters inside the decoder blocks, LoRA factors excluded: the ratio denominator."""
    from ..arch import get_adapter

    m = unwrap(model)
    seen: set[int] = set()
    n = 0
    for name, p in get_adapter(m).layers.named_parameters(remove_duplicate=False):
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return n
