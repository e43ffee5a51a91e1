"""Recovery checkpoints: `<out>/recovery/checkpoint-<step>/`, written atomically, no pickle.

A checkpoint holds what an exact resume needs: the adapter weights (`adapter.safetensors`),
the optimizer's tensors (`optimizer.safetensors`) with its hyper-parameters, the scheduler
and trainer state (`trainer_state.json`) and the RNG states (`rng.safetensors`, for dropout).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ShearkitError
from ..io.atomic import atomic_dir

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer `state_dict()` -> (tensors keyed `state.<param>.<name>`, everything else as JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = _cpu(value)
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of `split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    for pid, entry in meta["plain"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: Path, step: int, adapter: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict) -> Path:
    """Write `root/checkpoint-<step>` atomically (a crash leaves no half-written checkpoint)."""
    target = Path(root) / f"checkpoint-{step}"
    opt_tensors, opt_meta = split_optimizer_state(optimizer_state)
    with atomic_dir(target, overwrite=True) as tmp:
        save_file({k: _cpu(v) for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: _cpu(v) for k, v in rng_state().items()}, str(tmp / "rng.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step, "optimizer": opt_meta},
                                                 indent=1), encoding="utf-8")
    return target


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint: `adapter` tensors, `optimizer` state dict, `rng` states, `state` (JSON)."""
    path = Path(path)
    needed = ["adapter.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ShearkitError(f"Checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to resume "
                            "from an earlier one.")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    optimizer = join_optimizer_state(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    return {"adapter": load_file(str(path / "adapter.safetensors")), "optimizer": optimizer,
            "rng": load_file(str(path / "rng.safetensors")), "state": state}
