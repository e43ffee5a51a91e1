"""A uniform view of a decoder-only transformer, whatever its family.

Pruning code never touches a family's attribute names: it asks the adapter for the blocks,
and in each block for the attention and MLP projections (as `Proj` objects that hide whether
a weight is stored `(out, in)` like `nn.Linear` or `(in, out)` like GPT-2's `Conv1D`, and
whether q/k/v are fused into one tensor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Proj:
    """One projection, or one slice of a fused projection, with its weight seen as (out, in).

    `out_offset`/`out_size` select the rows of a fused weight that belong to this projection
    (GPT-2's `c_attn` holds q, k and v side by side); for a plain layer they cover it all.
    """

    name: str  # module path inside the model, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module
    transposed: bool = False  # True for Conv1D: weight stored (in, out)
    out_offset: int = 0
    out_size: int | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight as an (out, in) view (a slice of the fused tensor when fused)."""
        w = self.module.weight.T if self.transposed else self.module.weight
        if self.out_size is None:
            return w
        return w[self.out_offset : self.out_offset + self.out_size]

    @property
    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        if b is None or self.out_size is None:
            return b
        return b[self.out_offset : self.out_offset + self.out_size]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def fused(self) -> bool:
        return self.out_size is not None


@dataclass
class AttentionView:
    """Attention projections and head geometry of one block."""

    module: nn.Module
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads that read each KV head (1 without GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass
class MLPView:
    """MLP projections of one block: `inputs` read the residual stream (gate and up, or fc1),
    `output` writes back to it (down or fc2). Every input projection shares the channel axis."""

    module: nn.Module
    inputs: list[Proj]
    output: Proj

    @property
    def width(self) -> int:
        return self.output.in_features


@dataclass
class BlockView:
    """One decoder block: its module, attention, MLP and norms."""

    index: int
    name: str
    module: nn.Module
    attn: AttentionView
    mlp: MLPView
    norms: list[nn.Module] = field(default_factory=list)

    def projections(self) -> list[Proj]:
        """Every projection of the block, attention first."""
        a = self.attn
        return [a.q, a.k, a.v, a.o, *self.mlp.inputs, self.mlp.output]

    def linear_modules(self) -> dict[str, nn.Module]:
        """Distinct weight-holding modules of the block by full name (fused ones appear once)."""
        out: dict[str, nn.Module] = {}
        for p in self.projections():
            out.setdefault(p.name, p.module)
        return out


class ArchAdapter:
    """Maps one model family onto the uniform view. Subclasses set the class attributes and
    implement `block_view`; everything else is derived."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]  # dotted path of the ModuleList of blocks
    embed_paths: ClassVar[tuple[str, ...]]  # token (and position) embeddings
    final_norm_path: ClassVar[str | None]
    lm_head_path: ClassVar[str] = "lm_head"
    # config keys holding the uniform widths: "heads", "kv_heads", "mlp" -> the family's key
    width_config_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def sync_geometry_config(self) -> None:
        """Write into the config the sizes it derives by default but pruning may have changed
        (nothing for families whose config keys are all in `width_config_keys`)."""

    # -- structure -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def blocks(self) -> list[BlockView]:
        return [self.block_view(i) for i in range(self.num_layers)]

    def block_view(self, i: int) -> BlockView:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_name(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def embeddings(self) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.embed_paths]

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    @property
    def final_norm(self) -> nn.Module | None:
        return self.model.get_submodule(self.final_norm_path) if self.final_norm_path else None

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embeddings()[0].weight

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # -- parameter accounting --------------------------------------------------------------
    def block_param_count(self) -> int:
        """Parameters inside the decoder blocks (all weights and biases, norms included):
        the denominator of every pruning ratio in shearkit."""
        return sum(p.numel() for p in _unique_params(self.layers))

    def param_counts(self) -> dict[str, int]:
        """Total, unique (shared tensors counted once), embedding and non-embedding counts."""
        total = sum(p.numel() for _, p in self.model.named_parameters(remove_duplicate=False))
        unique = sum(p.numel() for p in _unique_params(self.model))
        emb = sum(p.numel() for m in self.embeddings() for p in _unique_params(m))
        if not self.tied_embeddings:
            emb += self.lm_head.weight.numel()
        return {"total": total, "unique": unique, "embedding": emb, "non_embedding": unique - emb,
                "blocks": self.block_param_count()}

    def describe(self) -> dict[str, Any]:
        b0 = self.block_view(0)
        return {"family": self.family, "model_type": self.config.model_type, "layers": self.num_layers,
                "hidden": self.hidden_size, "heads": b0.attn.num_heads, "kv_heads": b0.attn.num_kv_heads,
                "head_dim": b0.attn.head_dim, "mlp_width": b0.mlp.width, "tied_embeddings": self.tied_embeddings}


def _unique_params(module: nn.Module):
    seen: set[int] = set()
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield p
