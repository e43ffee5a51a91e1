"""Keep module attributes and `model.config` true after surgery.

transformers' attention reads a few cached integers (`num_key_value_groups` for `repeat_kv`,
OPT's `num_heads`, GPT-2's `split_size`); MLPs cache `intermediate_size`. After slicing, these
are reset from the weights. The config then either describes the model with its ordinary keys
(every layer the same width, and a model built from that config has exactly these shapes: a
plain `config.json` vanilla transformers loads), or keeps the keys it was built with and adds
`shearkit_layer_shapes`, the per-layer sizes a shearkit-aware loader (or the modeling file
written beside a saved model) applies after building the model. Weight-shared blocks (FlexiGPT)
are recorded beside either, under `shearkit_shared_blocks` (`surgery.shared_block.shared_spec`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..arch.modules import is_conv1d, module_shape, unwrap
from ..io.modeling import LAYER_SHAPES_KEY, SHARED_BLOCKS_KEY

# Cached integers that transformers' blocks read in forward; reset from the weights.
_ATTRS = ("num_heads", "num_key_value_heads", "num_key_value_groups", "split_size", "intermediate_size")


def sync_block_attrs(model: nn.Module) -> None:
    """Reset each block's cached head counts and widths from its weights."""
    from ..arch import get_adapter

    m = unwrap(model)
    for b in get_adapter(m).blocks():
        a = b.attn
        values = {"num_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads,
                  "num_key_value_groups": a.num_heads // a.num_kv_heads, "split_size": a.num_heads * a.head_dim}
        for k, v in values.items():
            if isinstance(getattr(a.module, k, None), int):
                setattr(a.module, k, v)
        for mod in (b.mlp.module,):
            if isinstance(getattr(mod, "intermediate_size", None), int):
                mod.intermediate_size = b.mlp.width


def layer_shapes(model: nn.Module) -> dict[str, Any]:
    """Per-layer module shapes `(out, in)` and cached attributes, by path inside the block."""
    from ..arch import get_adapter

    m = unwrap(model)
    ad = get_adapter(m)
    layers = []
    for blk in ad.layers:
        mods: dict[str, list[int]] = {}
        attrs: dict[str, int] = {}
        for name, mod in blk.named_modules():
            if "lora_" in name:
                continue
            clean = name.replace(".base_layer", "")
            if isinstance(mod, nn.Linear) or is_conv1d(mod):
                mods[clean] = list(module_shape(mod))
            for k in _ATTRS:
                v = getattr(mod, k, None)
                if isinstance(v, int) and not isinstance(v, bool) and name and not name.endswith(".base_layer"):
                    attrs[f"{clean}.{k}"] = v
        layers.append({"modules": mods, "attrs": attrs})
    return {"layers_path": ad.layers_path, "layers": layers}


def _base_class(model: nn.Module) -> type:
    cls = type(model)
    while cls.__name__ == "ShearkitForCausalLM":  # a per-layer model rebuilt by shearkit
        cls = cls.__bases__[0]
    return cls


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor shapes by name as a plain model of the class would have them: LoRA factors left out,
    and a shared block's `SharedLinear` counted as the layer it computes with (its weight, bias)."""
    from ..io.remote_code import SharedLinear

    shared = {n: mod for n, mod in model.named_modules() if isinstance(mod, SharedLinear)}
    out = {}
    for k, v in model.state_dict().items():
        if "lora_" in k or k.rpartition(".")[0].removesuffix(".out_norm") in shared:
            continue
        out[k.replace(".base_layer", "")] = tuple(v.shape)
    for n, mod in shared.items():
        out.update({f"{n}.{k}": tuple(p.shape) for k, p in mod.shared.named_parameters(recurse=False)})
    return out


def builds_same(model: nn.Module, config) -> bool:
    """True when the model's class built from `config` has exactly `model`'s tensor shapes."""
    cfg = copy.deepcopy(config)
    if hasattr(cfg, LAYER_SHAPES_KEY):
        delattr(cfg, LAYER_SHAPES_KEY)
    try:
        with torch.device("meta"):
            ref = _base_class(model)(cfg)
    except Exception:  # a config the class rejects (e.g. hidden not divisible by heads)
        return False
    return _state_shapes(ref) == _state_shapes(model)


def sync_config(model: nn.Module) -> str:
    """Make `model.config` describe the model; returns "vanilla" or "per-layer" (see module doc)."""
    from ..arch import get_adapter

    from .shared_block import shared_spec

    m = unwrap(model)
    ad = get_adapter(m)
    cfg = m.config
    cfg.num_hidden_layers = ad.num_layers
    spec = shared_spec(m)  # shared blocks are recorded whatever the widths (io/remote_code.py rebuilds both)
    if spec is not None:
        setattr(cfg, SHARED_BLOCKS_KEY, spec)
    elif hasattr(cfg, SHARED_BLOCKS_KEY):
        delattr(cfg, SHARED_BLOCKS_KEY)
    views = ad.blocks()
    geo = {(b.attn.num_heads, b.attn.num_kv_heads, b.mlp.width) for b in views}
    ad.sync_geometry_config()
    keys = ad.width_config_keys
    if len(geo) == 1 and keys:
        heads, kv, width = geo.pop()
        cand = copy.deepcopy(cfg)
        for what, value in (("heads", heads), ("kv_heads", kv), ("mlp", width)):
            if what in keys:
                setattr(cand, keys[what], value)
        if builds_same(m, cand):
            for what, value in (("heads", heads), ("kv_heads", kv), ("mlp", width)):
                if what in keys:
                    setattr(cfg, keys[what], value)
            if hasattr(cfg, LAYER_SHAPES_KEY):
                delattr(cfg, LAYER_SHAPES_KEY)
            return "vanilla"
    if not hasattr(cfg, LAYER_SHAPES_KEY) and builds_same(m, cfg):
        return "vanilla"
    setattr(cfg, LAYER_SHAPES_KEY, layer_shapes(m))
    return "per-layer"
