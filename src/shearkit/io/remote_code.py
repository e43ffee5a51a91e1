"""Modeling code for models transformers cannot build from a plain config (written beside them on save).

This file is self-contained (it imports only torch and transformers): `shearkit.save` copies it
as `modeling_shearkit.py` next to such a model and points `auto_map` at it, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without shearkit.
shearkit itself builds the same class from it (`make_class`), so both loaders give identical
models.

The model is the family's own transformers class built from the config's (uniform) sizes; then
each feature in `FEATURES` whose config key is present changes it, in order, before weights load:
- per-layer widths (`shearkit_layer_shapes`): layer by layer, every linear layer whose recorded
  `(out, in)` differs is replaced by one of the recorded shape and the cached integers (head
  counts, widths) are set;
- shared blocks (`shearkit_shared_blocks`, FlexiGPT): a replaced block's projections become
  `SharedLinear`s that compute with another block's layer, held by reference (one tensor in
  memory, stored once), plus their own low-rank adapter and, on the sub-layer outputs, their
  own mean-centring output norm.
Either, both or neither may be present; the shared blocks read the widths the first one set.
"""
import torch
import torch.nn.functional as F
import transformers
from torch import nn

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten when the file is saved beside a model
LAYER_SHAPES_KEY = "shearkit_layer_shapes"
SHARED_BLOCKS_KEY = "shearkit_shared_blocks"


def _is_conv1d(module):
    return type(module).__name__ == "Conv1D"


def _shape(module):
    w = module.weight
    return (w.shape[1], w.shape[0]) if _is_conv1d(module) else (w.shape[0], w.shape[1])


def _resized(module, out_f, in_f):
    w = module.weight
    has_bias = getattr(module, "bias", None) is not None
    if _is_conv1d(module):
        new = type(module)(out_f, in_f)  # Conv1D(nf=out, nx=in)
        return new.to(device=w.device, dtype=w.dtype)
    return nn.Linear(in_f, out_f, bias=has_bias, device=w.device, dtype=w.dtype)


def apply_layer_shapes(model, config):
    """Resize the blocks of `model` to the per-layer shapes recorded in `config` (no-op without)."""
    spec = getattr(config, LAYER_SHAPES_KEY, None)
    if not spec:
        return model
    layers = model.get_submodule(spec["layers_path"])
    if len(layers) != len(spec["layers"]):
        raise ValueError(f"{LAYER_SHAPES_KEY} lists {len(spec['layers'])} layers; the model has {len(layers)}.")
    for block, entry in zip(layers, spec["layers"]):
        for path, (out_f, in_f) in entry["modules"].items():
            parent_path, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            old = getattr(parent, leaf)
            if _shape(old) != (out_f, in_f):
                setattr(parent, leaf, _resized(old, out_f, in_f))
        for path, value in entry["attrs"].items():
            mod_path, _, attr = path.rpartition(".")
            setattr(block.get_submodule(mod_path) if mod_path else block, attr, value)
    return model


class OutputNorm(nn.Module):
    """FlexiGPT's output normalisation: gamma * (h - mean(h)) / std(h) over the hidden axis, a
    learnable scale and no bias (a true mean-centring norm, not RMSNorm), computed in float32."""

    def __init__(self, size, eps=1e-5, init=1e-2, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((size,), float(init), device=device, dtype=dtype))

    def forward(self, h):
        x = h.float()
        x = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)
        return (self.weight.float() * x).to(h.dtype)


class SharedLinear(nn.Module):
    """`base(x) + B (A x)`, then the optional output norm: `base` is another block's linear layer,
    held by reference and not registered here, so its weight is one tensor in memory, counted and
    saved once (under the block that owns it); `adapter_a` (rank, in) and `adapter_b` (out, rank)
    and `out_norm` belong to this position alone."""

    def __init__(self, base, rank, norm=False, eps=1e-5):
        super().__init__()
        object.__setattr__(self, "shared", base)  # a plain attribute: not a submodule, not in state_dict
        w = base.weight
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.rank = rank
        self.adapter_a = nn.Parameter(torch.zeros(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.adapter_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.out_norm = OutputNorm(self.out_features, eps, device=w.device, dtype=w.dtype) if norm else None

    @property
    def weight(self):
        """The shared weight (read-only use: writing it changes the block that owns it too)."""
        return self.shared.weight

    @property
    def bias(self):
        return self.shared.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, shared=True"

    def forward(self, x):
        y = F.linear(x, self.shared.weight, self.shared.bias)
        y = y + F.linear(F.linear(x, self.adapter_a), self.adapter_b)
        return self.out_norm(y) if self.out_norm is not None else y


def apply_shared_blocks(model, config):
    """Make the blocks recorded in `config` weight-shared copies of their bases (no-op without)."""
    spec = getattr(config, SHARED_BLOCKS_KEY, None)
    if not spec:
        return model
    layers = model.get_submodule(spec["layers_path"])
    for key, entry in spec["blocks"].items():
        block, base = layers[int(key)], layers[int(entry["base"])]
        for path, opts in entry["modules"].items():
            parent_path, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            setattr(parent, leaf, SharedLinear(base.get_submodule(path), int(opts["rank"]), bool(opts["norm"]),
                                               float(spec.get("norm_eps", 1e-5))))
    return model


FEATURES = (apply_layer_shapes, apply_shared_blocks)  # applied in this order, each only when its key is set


def make_class(base_name=BASE_ARCHITECTURE):
    """A subclass of transformers' `base_name` that applies the recorded features (`FEATURES`)."""
    base = getattr(transformers, base_name)

    class ShearkitForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            for feature in FEATURES:
                feature(self, config)

    return ShearkitForCausalLM


ShearkitForCausalLM = make_class()


def source_for(base_name):
    """This file's source with `BASE_ARCHITECTURE` set to `base_name` (what save writes)."""
    import inspect
    import sys

    text = inspect.getsource(sys.modules[__name__])
    return text.replace('BASE_ARCHITECTURE = "LlamaForCausalLM"', f'BASE_ARCHITECTURE = "{base_name}"', 1)
