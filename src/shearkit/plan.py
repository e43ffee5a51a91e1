"""The plan: a JSON record of what a pruning run removes or sparsifies, and where it came from.

A plan names structures by layer index and kind (never by object identity), carries the base
model's identity (name and a fingerprint of its weights, so an instruct model is told from its
base and a recovered model from its parent) and the exact ratio achieved. It can be saved,
shown as a table, and applied again to the same base model.

An unstructured plan also carries its keep-masks (`masks`, one bit per weight): they are saved
beside plan.json (the file named by `masks_file`) and loaded with it, or, when that file is
absent, derived from the pruned model's zeros (`Plan.load(path, model=...)`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import ShearkitError

SCHEMA_VERSION = 2  # 2: masks_file
log = logging.getLogger(__name__)


def fingerprint(model) -> str:
    """A short hash of the model's weights (names, shapes and a strided sample of every tensor); a lazy
    model's blocks are read from disk one tensor at a time."""
    from .io.lazy import lazy_weights

    store = lazy_weights(model)
    return fingerprint_state(store.state(model) if store is not None else model.state_dict())


def fingerprint_state(state) -> str:
    """`fingerprint` of a state dict (name -> tensor)."""
    import torch

    h = hashlib.blake2b(digest_size=12)
    for name in sorted(state):
        p = state[name]
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()


def base_fingerprint(model) -> str:
    """Fingerprint of the weights under the adapters, named as in the model before peft wrapped it
    (a checkpoint resumes only onto the same base weights)."""
    from .io.lazy import lazy_weights

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if lazy_weights(base) is not None:  # never wrapped by peft: no adapters to leave out
        return fingerprint(base)
    return fingerprint_state({k.replace(".base_layer", ""): v for k, v in base.state_dict().items()
                              if "lora_" not in k})


@dataclass
class Plan:
    """What to remove (structured) or zero (unstructured) in a base model.

    `layers` maps a layer index (as a string, for JSON) to that layer's entries, e.g.
    `{"heads": [...], "kv_groups": [...], "mlp_channels": [...]}` (removed indices) for
    structured methods, or `{"sparsity": {"self_attn.q_proj": 0.5, ...}, "pattern": "2:4"}`
    for unstructured ones. `blocks` lists removed blocks; `replaced` maps a replaced block to
    the block whose weights it shares. `masks` (unstructured plans): full module name -> (out,
    in) keep-mask, saved beside plan.json as `masks_file`, not inside the JSON.
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
    masks_file: str | None = None  # where `masks` were saved, relative to plan.json
    masks: Mapping[str, Any] | None = field(default=None, repr=False, compare=False, metadata={"json": False})

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
        """The JSON record (without the masks themselves, which are saved to their own file)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("json", True)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        """A plan from its JSON record; a record with unknown, missing or mistyped keys is refused by key."""
        if not isinstance(d, dict):
            raise ShearkitError(f"A plan must be a JSON object of keys (method, kind, ratio_target, ...), got "
                                f"{type(d).__name__}.")
        version = d.get("schema_version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise ShearkitError(f"Plan schema {d['schema_version']} is newer than this shearkit reads "
                                f"({SCHEMA_VERSION}); upgrade shearkit.")
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("json", True)}
        unknown_keys = set(d) - names
        if unknown_keys:
            raise ShearkitError(f"Plan has unknown keys: {', '.join(sorted(map(str, unknown_keys)))}.")
        check_record(d)
        return cls(**d)

    def save(self, path: str | Path, masks_file: str | None = None) -> None:
        """Write plan.json at `path` and, when the plan has masks, the masks beside it (as
        `masks_file`, relative to `path`'s folder; default `masks.safetensors`).

        Both are written atomically, the masks first; when writing plan.json then fails, the masks
        that were there before are put back, so the previous plan still reads with its own masks."""
        import os

        from .io.atomic import WriteFailed, write_error, write_json

        path = Path(path)
        d = {**self.to_dict(), "schema_version": SCHEMA_VERSION, "masks_file": None}  # written as this version
        if not self.masks:
            write_json(path, d)
            return
        from .sparsity.apply import MASKS_FILE, save_masks

        d["masks_file"] = masks_file or MASKS_FILE
        masks = path.parent / d["masks_file"]
        had_plan = path.exists()
        backup = None
        if masks.is_file():  # the previous masks, kept (a second name of the same file) until plan.json is written
            backup = masks.with_name(f".{masks.name}.prev-{os.getpid()}")
            backup.unlink(missing_ok=True)
            try:
                try:
                    os.link(masks, backup)
                except OSError:  # a file system without hard links
                    import shutil

                    shutil.copy2(masks, backup)
            except OSError as e:
                backup.unlink(missing_ok=True)
                raise write_error(masks, e, kept=True) from e
        try:
            save_masks(self.masks, masks)
            write_json(path, d)
        except BaseException as e:
            if isinstance(e, WriteFailed) and e.path == path and e.kept is None:
                raise  # plan.json and its masks are both new (only syncing the folder failed)
            if backup is not None:
                if not (masks.exists() and os.path.samefile(backup, masks)):  # the masks were replaced
                    os.replace(backup, masks)
                    backup = None
            else:
                masks.unlink(missing_ok=True)  # the previous plan had no masks there
            if isinstance(e, WriteFailed) and e.os_error is not None:
                raise write_error(path, e.os_error, kept=had_plan,
                                  detail=masks.name if e.path == masks else "") from e
            raise
        finally:
            if backup is not None:
                backup.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path, model=None) -> "Plan":
        """Read plan.json (`path` or a directory holding it) with its masks.

        The masks come from the file the plan names (or, for plans written before it named one, a
        `masks.safetensors` beside it); when that is absent and `model` (the pruned model) is
        given, an unstructured plan's masks are derived from the model's zeros.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "plan.json"
        if not p.exists():
            raise ShearkitError(f"Plan file not found: {p}. Give a plan.json, or the run or model directory "
                                "that holds one.")
        try:
            plan = cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ShearkitError(f"{p} is not a valid plan (JSON error: {e}).") from None
        except ShearkitError as e:
            raise ShearkitError(f"{p} is not a valid plan: {e}") from None
        if plan.kind == "unstructured":
            from .sparsity.apply import MASKS_FILE, load_masks, masks_from_model

            file = p.parent / (plan.masks_file or MASKS_FILE)
            if file.is_file():
                plan.masks = load_masks(file)
            elif model is not None:
                log.info("%s: no masks file (%s); the masks are the model's zeros.", p, file.name)
                plan.masks = masks_from_model(model, plan)
        return plan

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


KINDS = ("structured", "unstructured", "blocks")
# what each key of a plan record holds: (a description for the error, a test of the value)
_FIELD_TYPES: dict[str, tuple[str, Any]] = {
    "method": ("a string", lambda v: isinstance(v, str)),
    "kind": (" or ".join(KINDS), lambda v: v in KINDS),
    "ratio_target": ("a finite number", lambda v: _is_number(v)),
    "ratio_achieved": ("a finite number", lambda v: _is_number(v)),
    "base": ("an object", lambda v: isinstance(v, dict)),
    "config": ("an object", lambda v: isinstance(v, dict)),
    "layers": ("an object of layer index -> object of entries",
               lambda v: isinstance(v, dict) and all(_is_index(k) and isinstance(e, dict) for k, e in v.items())),
    "blocks": ("a list of block indices", lambda v: isinstance(v, list) and all(_is_int(i) for i in v)),
    "replaced": ("an object of block index -> block index",
                 lambda v: isinstance(v, dict) and all(_is_index(k) and _is_int(i) for k, i in v.items())),
    "hidden_channels": ("a list of channel indices", lambda v: isinstance(v, list) and all(_is_int(i) for i in v)),
    "extra": ("an object", lambda v: isinstance(v, dict)),
    "schema_version": ("an integer", lambda v: _is_int(v)),
    "shearkit_version": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string", lambda v: isinstance(v, str)),
    "masks_file": ("a file name or null", lambda v: v is None or (isinstance(v, str) and v != "")),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _is_index(k: Any) -> bool:
    return isinstance(k, str) and k.isascii() and k.isdigit()


def check_record(d: dict[str, Any]) -> None:
    """Refuse a plan record that lacks a required key or holds a value of the wrong type, naming the key."""
    missing = [k for k in ("method", "kind", "ratio_target") if k not in d]
    if missing:
        raise ShearkitError(f"Plan is missing keys: {', '.join(missing)}.")
    for key, value in d.items():
        what, ok = _FIELD_TYPES[key]
        if not ok(value):
            raise ShearkitError(f"Plan key '{key}' must be {what}, got {_clip(value)}.")


def _clip(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _short(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
