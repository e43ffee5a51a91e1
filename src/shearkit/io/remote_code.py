"""Modeling code for models whose layers have different widths (written beside them on save).

This file is self-contained (it imports only torch and transformers): `shearkit.save` copies it
as `modeling_shearkit.py` next to a per-layer-width model and points `auto_map` at it, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without shearkit.
shearkit itself builds the same class from it (`make_class`), so both loaders give identical
models.

The model is the family's own transformers class built from the config's (uniform) sizes; then,
layer by layer, every linear layer whose recorded `(out, in)` differs is replaced by one of the
recorded shape and the cached integers (head counts, widths) are set, before weights load.
"""
import transformers
from torch import nn

BASE_ARCHITECTURE = "LlamaForCausalLM"  # rewritten when the file is saved beside a model
LAYER_SHAPES_KEY = "shearkit_layer_shapes"


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


def make_class(base_name=BASE_ARCHITECTURE):
    """A subclass of transformers' `base_name` that applies the recorded per-layer shapes."""
    base = getattr(transformers, base_name)

    class ShearkitForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_layer_shapes(self, config)

    return ShearkitForCausalLM


ShearkitForCausalLM = make_class()


def source_for(base_name):
    """This file's source with `BASE_ARCHITECTURE` set to `base_name` (what save writes)."""
    import inspect
    import sys

    text = inspect.getsource(sys.modules[__name__])
    return text.replace('BASE_ARCHITECTURE = "LlamaForCausalLM"', f'BASE_ARCHITECTURE = "{base_name}"', 1)
