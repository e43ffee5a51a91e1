"""Checkpoints of the long stages that are not training loops: the blockwise loop of the unstructured
methods, gradient and statistics passes, sensitivity trials (training loops use `recovery.checkpoint`).

A stage keeps a folder: `state.json` says what is done and records the identity of the run that
wrote it (the base weights' fingerprint, a digest of the calibration tokens, the settings that
change the result); tensors go to safetensors files beside it. Every file is written atomically
(`io.atomic`), `state.json` last (or, for a snapshot of accumulators, into a new numbered folder
renamed into place whole), so a kill at any point leaves the previous state or the new one;
nothing is pickled. A resumed stage reads the state only when its identity matches, and
otherwise refuses, naming the keys that differ.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ShearkitError
from .atomic import atomic_dir, write_json

STATE = "state.json"


def tensor_digest(t) -> str:
    """A hash of a tensor's dtype, shape and every byte (e.g. the calibration tokens)."""
    import torch

    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _plain(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(obj, default=str))


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists and scalars are leaves)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def differing_keys(old: Mapping, new: Mapping) -> list[str]:
    """Dotted keys whose values differ between two nested dicts (present in one only included)."""
    a, b = flatten(_plain(dict(old))), flatten(_plain(dict(new)))
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def read_state(root: Path | None, identity: Mapping, *, resume: bool, what: str) -> dict | None:
    """The state a stage left in `root`, or None when it has none (or `root` is None).

    Raises ShearkitError when `root` holds a state but `resume` is false (a fresh run must not mix
    with an earlier one), or when the state was written by a run of another identity (the message
    names the keys that differ).
    """
    if root is None:
        return None
    f = Path(root) / STATE
    if not f.is_file():
        return None
    if not resume:
        raise ShearkitError(f"{root} already holds the checkpoint of an earlier {what}; pass resume=True (CLI: "
                            "--resume) to continue it, or choose another output directory.")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShearkitError(f"The checkpoint {f} cannot be read ({e}); delete {root} to redo the {what}.") from None
    if not isinstance(state, dict):
        raise ShearkitError(f"The checkpoint {f} is not a JSON object; delete {root} to redo the {what}.")
    changed = differing_keys(state.get("identity") or {}, identity)
    if changed:
        raise ShearkitError(f"Cannot resume the {what} from {root}: it was written with other "
                            f"{', '.join(changed)}; resume with the same model, data and settings, or choose "
                            "another output directory.")
    return state


def write_state(root: Path, identity: Mapping, state: Mapping) -> None:
    """Write `root/state.json` atomically (after the tensor files it refers to)."""
    write_json(Path(root) / STATE, {**_plain(dict(state)), "identity": _plain(dict(identity))})


def save_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    """Write a safetensors file atomically (tensors copied to the CPU, made contiguous)."""
    from safetensors.torch import save_file

    from .atomic import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: Path, what: str) -> dict[str, Any]:
    """Read a safetensors file a stage wrote; a missing or damaged one raises ShearkitError naming it."""
    from safetensors.torch import load_file

    from .weights import check_safetensors

    check_safetensors(path, f"{what} checkpoint file")
    return load_file(str(path))


def save_snapshot(root: Path, identity: Mapping, state: Mapping, tensors: Mapping[str, Any], number: int) -> Path:
    """Write `root/snapshot-<number>/` (`tensors.safetensors` and `state.json`) as one atomic folder,
    then remove the older snapshots: a kill at any point leaves at least one whole snapshot."""
    import shutil

    from safetensors.torch import save_file

    root = Path(root)
    target = root / f"snapshot-{number:08d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        write_state(tmp, identity, state)
    for old in root.glob("snapshot-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return target


def latest_snapshot(root: Path | None) -> Path | None:
    """The newest whole snapshot under `root` (None: none, or no `root`)."""
    if root is None or not Path(root).is_dir():
        return None
    found = sorted(p for p in Path(root).glob("snapshot-*") if p.name[9:].isdigit() and (p / STATE).is_file())
    return found[-1] if found else None


def load_snapshot_tensors(snapshot: Path, what: str) -> dict[str, Any]:
    return load_tensors(Path(snapshot) / "tensors.safetensors", what)
