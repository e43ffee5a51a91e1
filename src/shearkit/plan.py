"""The plan: a JSON record of what a pruning run removes or sparsifies, and where it came from.

A plan names structures by layer index and kind (never by object identity), carries the base
model's identity (name and a fingerprint of its weights, so an instruct model is told from its
base and a recovered model from its parent) and the exact ratio achieved. It can be saved,
shown as a table, and applied again to the same base model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ShearkitError

SCHEMA_VERSION = 1


def fingerprint(model) -> str:
    """A short hash of the model's weights (names, shapes and a strided sample of every tensor)."""
    import torch

    h = hashlib.blake2b(digest_size=12)
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Plan:
    """What to remove (structured) or zero (unstructured) in a base model.

    `layers` maps a layer index (as a string, for JSON) to that layer's entries, e.g.
    `{"heads": [...], "kv_groups": [...], "mlp_channels": [...]}` (removed indices) for
    structured methods, or `{"sparsity": {"self_attn.q_proj": 0.5, ...}, "pattern": "2:4"}`
    for unstructured ones. `blocks` lists removed blocks; `replaced` maps a replaced block to
    the block whose weights it shares.
    """

    method: str
    kind: str  # structured | unstructured | blocks
    ratio_target: float
    ratio_achieved: float = 0.0
    base: dict[str, Any] = field(default_factory=dict)  # name, model_type, fingerprint, block_params
    config: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: list[int] = field(default_factory=list)
    replaced: dict[str, int] = field(default_factory=dict)
    hidden_channels: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific records (scores, curves)
    schema_version: int = SCHEMA_VERSION
    shearkit_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    # -- identity ---------------------------------------------------------------------------
    @staticmethod
    def describe_base(model) -> dict[str, Any]:
        from .arch import get_adapter

        ad = get_adapter(model)
        return {"name": getattr(model.config, "name_or_path", None) or "", "model_type": model.config.model_type,
                "fingerprint": fingerprint(model), "block_params": ad.block_param_count(),
                "num_layers": ad.num_layers,
                # per-layer widths of the base, so a report can show kept = base - removed
                "geometry": [{"heads": b.attn.num_heads, "kv_heads": b.attn.num_kv_heads, "head_dim": b.attn.head_dim,
                              "mlp": b.mlp.width} for b in ad.blocks()]}

    def check_base(self, model) -> None:
        """Refuse to apply this plan to a model other than the one it was made for."""
        if not self.base:
            return
        fp = fingerprint(model)
        if fp != self.base.get("fingerprint"):
            raise ShearkitError(
                f"This plan was made for '{self.base.get('name')}' (weights fingerprint {self.base.get('fingerprint')}), "
                f"but the model given has fingerprint {fp}. Apply a plan only to the exact base model it was made "
                "from (an instruct model and its base, or a recovered model and its parent, differ).")

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("schema_version", 1) > SCHEMA_VERSION:
            raise ShearkitError(f"Plan schema {d['schema_version']} is newer than this shearkit reads "
                                f"({SCHEMA_VERSION}); upgrade shearkit.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown_keys = set(d) - names
        if unknown_keys:
            raise ShearkitError(f"Plan has unknown keys: {', '.join(sorted(unknown_keys))}.")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from .io.atomic import write_json

        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if p.is_dir():
            p = p / "plan.json"
        if not p.exists():
            raise ShearkitError(f"Plan file not found: {p}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ShearkitError(f"{p} is not a valid plan (JSON error: {e}).") from None

    # -- display ----------------------------------------------------------------------------
    def summary_rows(self) -> list[list[Any]]:
        """One row per layer: layer, then each entry (counts for index lists, values otherwise)."""
        rows = []
        for li in sorted(self.layers, key=int):
            entry = self.layers[li]
            cells = []
            for k, v in entry.items():
                if isinstance(v, list):
                    cells.append(f"{k}: -{len(v)}")
                elif isinstance(v, dict):
                    cells.append(f"{k}: " + ", ".join(f"{kk}={_short(vv)}" for kk, vv in v.items()))
                else:
                    cells.append(f"{k}: {_short(v)}")
            rows.append([li, "; ".join(cells)])
        return rows


def _short(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
