"""The weight files of a model directory, checked before loading so that damage is named.

A truncated or overwritten `model.safetensors` otherwise fails deep inside transformers with a
long traceback. Opening each file's header with safetensors is cheap (the data is memory-mapped,
not read) and catches a cut-off file, a file that is not safetensors at all, and a shard the
index names but the folder lacks.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ShearkitError

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a model directory: the shards its index names, else
    `model.safetensors` (other `*.safetensors` files, such as shearkit's masks, are not weights)."""
    path = Path(path)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not all(isinstance(s, str) and s for s in shards):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, AttributeError, TypeError) as e:
            raise ShearkitError(f"{index} is damaged ({type(e).__name__}: {e}); re-save or re-download the "
                                "model.") from None
        return [path / s for s in shards]
    single = path / WEIGHTS_FILE
    return [single] if single.is_file() else []


def check_safetensors(file: str | Path, what: str = "weights file") -> None:
    """Open a safetensors file's header; a missing, truncated or corrupt file raises ShearkitError naming it."""
    from safetensors import SafetensorError, safe_open

    file = Path(file)
    try:
        exists = file.is_file()
    except OSError:  # e.g. a name too long for the file system
        exists = False
    if not exists:
        raise ShearkitError(f"The {what} {file} is missing; re-save or re-download the model.")
    try:
        with safe_open(str(file), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ShearkitError(f"The {what} {file} is damaged ({e}): it is truncated or not a safetensors file. "
                            "Re-save or re-download the model; shearkit cannot load it as it is.") from None


def check_weight_files(path: str | Path) -> list[Path]:
    """Check every weight file of a model directory (see `check_safetensors`) and return them."""
    files = weight_files(path)
    for f in files:
        check_safetensors(f)
    return files


def read_config(path: str | Path) -> dict:
    """A model directory's config.json as a dict; unreadable JSON, or JSON that is not an object, raises
    ShearkitError naming the file."""
    cfg = Path(path) / "config.json"
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ShearkitError(f"{cfg} is damaged (not valid JSON: {e}); re-save or re-download the model.") from None
    if not isinstance(config, dict):
        raise ShearkitError(f"{cfg} is damaged: it holds a JSON {type(config).__name__}, not an object of config keys; "
                            "re-save or re-download the model.")
    return config
