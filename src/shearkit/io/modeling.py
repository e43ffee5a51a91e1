"""Models vanilla transformers cannot build from their config: per-layer widths, shared blocks.

Vanilla transformers configs hold one width for all layers and one set of weights per block;
shearkit records per-layer sizes in `config.json` under `shearkit_layer_shapes` and weight-shared
blocks (FlexiGPT) under `shearkit_shared_blocks`, and rebuilds the model from them with the
modeling file saved beside it (`io/remote_code.py`).
"""
from __future__ import annotations

import json
from pathlib import Path

LAYER_SHAPES_KEY = "shearkit_layer_shapes"
SHARED_BLOCKS_KEY = "shearkit_shared_blocks"
REMOTE_KEYS = (LAYER_SHAPES_KEY, SHARED_BLOCKS_KEY)  # config keys that need the modeling file


def needs_modeling_file(config: dict) -> bool:
    """True when a config (as a dict) records a feature only shearkit's modeling file builds."""
    return any(config.get(k) for k in REMOTE_KEYS)


def transformers_class(name: str) -> type:
    """transformers' model class called `name`; anything else (e.g. text from a config) is refused, so
    only such a name ever goes into a modeling file or picks the class a model is built with."""
    import transformers

    from ..errors import ShearkitError

    try:
        cls = getattr(transformers, name) if isinstance(name, str) and name.isidentifier() else None
    except (AttributeError, ImportError, RuntimeError):  # no such name, or a class whose backend is missing
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ShearkitError(f"'{str(name)[:80]}' is not a model class of this transformers version; shearkit builds "
                            "and writes modeling files only for transformers' own classes (e.g. LlamaForCausalLM).")
    return cls


def is_shearkit_model(path: str | Path) -> bool:
    """True when a model directory's config records per-layer sizes or shared blocks."""
    cfg = Path(path) / "config.json"
    return cfg.exists() and needs_modeling_file(json.loads(cfg.read_text()))


def load_shearkit_model(path: str | Path, torch_dtype=None):
    """Load a model saved with per-layer widths or shared blocks (see the module doc).

    Uses the same class that the `modeling_shearkit.py` written beside the model defines, so this
    and `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` give identical models.
    """
    from ..errors import ShearkitError
    from .remote_code import make_class

    cfg = json.loads((Path(path) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not archs or not isinstance(archs, list):
        raise ShearkitError(f"{path}/config.json names no architecture (a list such as [\"LlamaForCausalLM\"]); "
                            "re-save the model with shearkit.save.")
    try:
        cls = make_class(transformers_class(archs[0]).__name__)
    except ShearkitError as e:
        raise ShearkitError(f"{path}: {e}") from None
    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    return cls.from_pretrained(path, **kwargs)
