"""Block surgery: change which decoder blocks a model has, keeping everything that counts them true.

A decoder block's position is written in several places besides the `ModuleList` that holds it:
each attention module's `layer_idx` (its slot in the KV cache), `config.num_hidden_layers` (the
model's forward and the cache read it), per-layer config lists (`layer_types`: which blocks use
sliding-window attention; Qwen2's `max_window_layers`) and shearkit's per-layer widths
(`shearkit_layer_shapes`, when the model has them). `rebuild_blocks` installs a new sequence of
blocks and rewrites all of these from one description, `sources`: for each new position, the
old block whose per-layer settings it takes. Removing blocks (`remove_blocks`) is the case where
`sources` is the kept blocks in order; inserting a copy of block s (model extension) or putting
a shared copy of s where a block was (FlexiGPT) are the cases where a source repeats, with the
new module given in `modules`. A module placed at two positions would share one `layer_idx`
(one KV-cache slot): such callers pass a distinct module per position (sharing weights, not
modules). After `rebuild_blocks` the model runs, decodes with its KV cache, saves and reloads.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..io.modeling import LAYER_SHAPES_KEY

# config lists with one entry per decoder block, rewritten with the blocks
PER_LAYER_LISTS = ("layer_types",)


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> None:
    """Delete decoder blocks `indices` in place; the survivors are renumbered (see the module doc).

    Raises:
        ShearkitError: an index out of range, or every block removed.
    """
    from ..arch import get_adapter

    n = get_adapter(unwrap(model)).num_layers
    gone = set(indices)
    bad = sorted(i for i in gone if not (isinstance(i, int) and 0 <= i < n))
    if bad:
        raise ShearkitError(f"Cannot remove blocks {bad}: the model has blocks 0..{n - 1}.")
    if len(gone) >= n:
        raise ShearkitError(f"Removing {len(gone)} of {n} blocks would leave none; keep at least one.")
    if gone:
        rebuild_blocks(model, [i for i in range(n) if i not in gone])


def rebuild_blocks(model: nn.Module, sources: Sequence[int], modules: Sequence[nn.Module] | None = None) -> None:
    """Make the model's blocks `modules` (default: the current blocks `sources`), block j taking
    the per-layer settings of old block `sources[j]`; renumber `layer_idx` and rewrite the config.

    Raises:
        ShearkitError: a source out of range, lengths that differ, a module placed twice, or a
            model whose blocks compute with their position (GPT-2's `scale_attn_by_inverse_layer_idx`)
            moved to another position.
    """
    from ..arch import get_adapter

    m = unwrap(model)
    ad = get_adapter(m)
    n = ad.num_layers
    old = list(ad.layers)
    sources = [int(s) for s in sources]
    if not sources:
        raise ShearkitError("A model needs at least one decoder block.")
    if any(not 0 <= s < n for s in sources):
        raise ShearkitError(f"Block sources {sources} name blocks outside 0..{n - 1}.")
    new = [old[s] for s in sources] if modules is None else list(modules)
    if len(new) != len(sources):
        raise ShearkitError(f"{len(new)} blocks given for {len(sources)} positions.")
    if len({id(b) for b in new}) != len(new):
        raise ShearkitError("A block module appears at two positions; each position needs its own module "
                            "(its own KV-cache slot), which may share weights with another.")
    cfg = m.config
    moved = any(_position(b) not in (None, j) for j, b in enumerate(new))
    if moved and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ShearkitError("This GPT-2 model scales attention by 1/(layer index + 1) "
                            "(scale_attn_by_inverse_layer_idx), so a block computes differently at another "
                            "position; blocks cannot be moved in it.")
    parent_path, _, leaf = ad.layers_path.rpartition(".")
    setattr(m.get_submodule(parent_path) if parent_path else m, leaf, nn.ModuleList(new))
    for j, blk in enumerate(new):
        for mod in blk.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    _rewrite_config(cfg, n, sources)


def _position(block: nn.Module) -> int | None:
    """The `layer_idx` a block's modules hold (None when none does)."""
    for mod in block.modules():
        v = getattr(mod, "layer_idx", None)
        if isinstance(v, int):
            return v
    return None


def _rewrite_config(cfg, n: int, sources: list[int]) -> None:
    """Per-block config entries follow their blocks; the count becomes len(sources)."""
    cfg.num_hidden_layers = len(sources)
    for key in PER_LAYER_LISTS:
        values = getattr(cfg, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(cfg, key, [values[s] for s in sources])
    mwl = getattr(cfg, "max_window_layers", None)  # Qwen2: blocks from this index on may use sliding windows
    if isinstance(mwl, int) and not isinstance(mwl, bool):
        cfg.max_window_layers = sum(1 for s in sources if s < mwl)
    shapes = getattr(cfg, LAYER_SHAPES_KEY, None)
    if isinstance(shapes, dict) and isinstance(shapes.get("layers"), list) and len(shapes["layers"]) == n:
        setattr(cfg, LAYER_SHAPES_KEY, {**shapes, "layers": [shapes["layers"][s] for s in sources]})
