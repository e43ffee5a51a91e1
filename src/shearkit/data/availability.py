"""Whether the data a run needs can be had, checked without reading it and before anything slow.

A named set is available from a file path, from the local data directory (`--data-dir` /
$SHEARKIT_DATA), or from the Hugging Face hub. With the hub switched off (HF_HUB_OFFLINE /
HF_DATASETS_OFFLINE) a set that is neither local nor in the hub cache is an error at once; online,
the hub is probed once with a short timeout rather than retried for half a minute.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import ShearkitError, unknown
from .sources import DATA_ENV, DATASETS, _looks_like_path, named_split, resolve_data_dir

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 5.0
_NO_DATA_DIR = f"no data directory is set (${DATA_ENV} or --data-dir)"


def hub_offline() -> bool:
    """True when the user switched the Hugging Face hub off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


@functools.lru_cache(maxsize=1)
def hub_unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers an HTTP request within `timeout` seconds, else why not (one try, no retries)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)  # any HTTP answer means it is reachable
    except Exception as e:  # no network, DNS failure, timeout, proxy refusal
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None


def _need_local(what: str, why: str) -> ShearkitError:
    return ShearkitError(f"{what} is not available: {why}. Set ${DATA_ENV} or pass --data-dir (a folder laid out "
                         "as docs/data.md describes), or give a file path.")


def check_hub(what: str) -> None:
    """Raise now when `what` would need the hub and the hub is switched off or unreachable."""
    if hub_offline():
        raise _need_local(what, f"{_NO_DATA_DIR} and the hub is switched off ({' / '.join(OFFLINE_VARS)})")
    reason = hub_unreachable_reason()
    if reason is not None:
        raise _need_local(what, f"{_NO_DATA_DIR} and the Hugging Face hub is unreachable ({reason}); offline, "
                                f"set {OFFLINE_VARS[0]}=1 to skip hub look-ups")


def check_text_set(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None,
                   purpose: str = "") -> None:
    """Raise ShearkitError unless the text set (or file) `name` can be read for `split`; reads nothing."""
    what = f"Data set '{name}'" + (f" ({purpose})" if purpose else "")
    if _looks_like_path(name):
        if not Path(name).expanduser().is_file():
            raise ShearkitError(f"{what}: file not found: {name}")
        return
    ds, split = named_split(name, split, what)
    root = resolve_data_dir(data_dir)
    if root is not None:
        missing = [str(root / f) for f in ds.splits[split] if not (root / f).exists()]
        if missing:
            raise ShearkitError(f"{what} split '{split}' needs {', '.join(missing)}, which is not in the data "
                                f"directory {root}.")
        return
    if ds.hub is None:
        raise _need_local(what, f"{_NO_DATA_DIR} and it has no hub source")
    if hub_offline() and _in_hub_cache(ds, split):
        return
    check_hub(what)


def _in_hub_cache(ds, split: str) -> bool:
    """True when the `datasets` cache can serve the set offline (checked without downloading)."""
    path, config, split_map, _ = ds.hub
    try:
        import datasets

        builder = datasets.load_dataset_builder(path, config)
        return builder.info.splits is None or split_map.get(split, split) in builder.info.splits
    except Exception:
        return False


def check_instruction_set(name: str, data_dir: str | os.PathLike | None = None) -> None:
    """Raise ShearkitError unless the instruction set (or .json/.jsonl file) `name` can be read; reads nothing."""
    if _looks_like_path(name):
        if not Path(name).expanduser().is_file():
            raise ShearkitError(f"Instruction file not found: {name}")
        return
    if name not in DATASETS:
        raise unknown("data set", name, DATASETS)
    root = resolve_data_dir(data_dir)
    if root is None:
        raise _need_local(f"Instruction set '{name}'", f"{_NO_DATA_DIR}, and instruction sets are read only from it")
    missing = [str(root / f) for f in DATASETS[name].splits["train"] if not (root / f).exists()]
    if missing:
        raise ShearkitError(f"Instruction set '{name}' needs {', '.join(missing)}, which is not in the data "
                            f"directory {root}.")
