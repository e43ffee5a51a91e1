"""Recovery checkpoints: `<out>/recovery/checkpoint-<step>/`, written atomically, no pickle.

A checkpoint holds what an exact resume needs: the adapter weights (`adapter.safetensors`),
the optimizer's tensors (`optimizer.safetensors`) with its hyper-parameters, the scheduler
and trainer state (`trainer_state.json`), the RNG states (`rng.safetensors`, for dropout) and
each callback's state: its tensors in `callbacks.safetensors` (keyed `<name>.<key>`, written
only when a callback holds tensors), the rest in `trainer_state.json` under `callbacks`.
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
CALLBACK_FILE = "callbacks.safetensors"
_TENSOR = "$tensor"  # marks, in the JSON state, a tensor stored in CALLBACK_FILE under this key


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


def ranks_rng_state(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every process's RNG states in one checkpoint file: `rank<k>.<name>` (dropout draws differ by process,
    so each resumes with its own)."""
    return {f"rank{k}.{name}": t for k, states in enumerate(per_rank) for name, t in states.items()}


def rank_rng_state(states: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """This process's RNG states from a checkpoint's: its own `rank<k>.` entries, else the one set a
    single-process checkpoint holds."""
    prefix = f"rank{rank}."
    mine = {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}
    return mine or states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def split_tensors(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with every tensor (also inside dicts and lists) moved to `tensors[<key>.<path>]`
    and replaced by a marker naming it; the rest must be JSON-able."""
    if torch.is_tensor(value):
        tensors[key] = _cpu(value)
        return {_TENSOR: key}
    if isinstance(value, dict):
        return {k: split_tensors(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors` (tensors come back on the CPU)."""
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def save_checkpoint(root: Path, step: int, adapter: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict, callbacks: dict[str, dict] | None = None,
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `root/checkpoint-<step>` atomically (a crash leaves no half-written checkpoint).

    `callbacks` maps each callback's name to its `state_dict()` (tensors and JSON-able values); `rng`:
    the RNG states to keep (default: this process's; several processes: `ranks_rng_state`)."""
    target = Path(root) / f"checkpoint-{step}"
    opt_tensors, opt_meta = split_optimizer_state(optimizer_state)
    cb_tensors: dict[str, torch.Tensor] = {}
    cb_plain = {name: split_tensors(dict(state), name, cb_tensors) for name, state in (callbacks or {}).items()}
    state = {**trainer_state, "step": step, "optimizer": opt_meta}
    if cb_plain:
        state["callbacks"] = cb_plain
    try:
        text = json.dumps(state, indent=1)
    except TypeError as e:
        raise ShearkitError(f"A callback's state_dict() holds a value that is neither a tensor nor JSON-able ({e}); "
                            "return tensors, numbers, strings, lists or dicts.") from None
    with atomic_dir(target, overwrite=True) as tmp:
        save_file({k: _cpu(v) for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: _cpu(v) for k, v in (rng or rng_state()).items()}, str(tmp / "rng.safetensors"))
        if cb_tensors:
            save_file(cb_tensors, str(tmp / CALLBACK_FILE))
        (tmp / STATE_FILE).write_text(text, encoding="utf-8")
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
    """Read a checkpoint: `adapter` tensors, `optimizer` state dict, `rng` states, `state` (JSON),
    `callbacks` (name -> state dict, tensors on the CPU)."""
    path = Path(path)
    needed = ["adapter.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise ShearkitError(f"Checkpoint {path} is incomplete (missing {', '.join(missing)}); delete it to resume "
                            "from an earlier one.")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    optimizer = join_optimizer_state(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
    callbacks = state.pop("callbacks", {})
    if callbacks:
        cb_file = path / CALLBACK_FILE
        callbacks = join_tensors(callbacks, load_file(str(cb_file)) if cb_file.is_file() else {})
    return {"adapter": load_file(str(path / "adapter.safetensors")), "optimizer": optimizer,
            "rng": load_file(str(path / "rng.safetensors")), "state": state, "callbacks": callbacks}
