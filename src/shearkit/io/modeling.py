"""Models whose layers have different widths (per-layer head counts / MLP widths).

Vanilla transformers configs hold one width for all layers; shearkit records per-layer sizes
in `config.json` under `shearkit_layer_shapes` and rebuilds the model from them.
"""
from __future__ import annotations

import json
from pathlib import Path

LAYER_SHAPES_KEY = "shearkit_layer_shapes"


def is_shearkit_model(path: str | Path) -> bool:
    """True when a model directory's config records per-layer sizes."""
    cfg = Path(path) / "config.json"
    return cfg.exists() and LAYER_SHAPES_KEY in json.loads(cfg.read_text())


def load_shearkit_model(path: str | Path, torch_dtype):  # filled in with the structured-pruning core
    from ..errors import ShearkitError

    raise ShearkitError(f"{path} holds a model with per-layer widths, which this version cannot rebuild yet.")
