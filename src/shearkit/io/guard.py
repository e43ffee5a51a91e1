"""Refusals before shearkit deletes or replaces a folder the user named.

Whatever `--overwrite` says, shearkit never removes the working directory, a home directory, or
a folder that holds (or is) one of the run's inputs: the model it reads, its data.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import ShearkitError


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _covers(folder: Path, other: Path) -> bool:
    """True when removing `folder` would remove `other` (the same path, or one of its parents)."""
    return folder == other or folder in other.parents


def refuse_unsafe_removal(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                          flag: str = "--out") -> None:
    """Raise ShearkitError when removing `path` would remove the working or home directory, or an input.

    `inputs` are paths the command reads (strings that name no existing path are ignored).
    """
    target = _resolved(path)
    homes = {_resolved(Path.home())}
    if os.environ.get("HOME"):
        homes.add(_resolved(os.environ["HOME"]))
    guarded = [(_resolved(Path.cwd()), "the working directory")] + [(h, "a home directory") for h in homes]
    for place, what in guarded:
        if _covers(target, place):
            where = "is" if target == place else "contains"
            raise ShearkitError(f"{path} {where} {what}; shearkit will not delete it. Choose another {flag} "
                                "(a new folder such as runs/<name>).")
    for item in inputs:
        if not item:
            continue
        p = Path(item).expanduser()
        if not p.exists():
            continue
        if _covers(target, _resolved(p)):
            where = "is" if target == _resolved(p) else "contains"
            raise ShearkitError(f"{path} {where} {item}, an input of this run; shearkit never deletes its inputs. "
                                f"Choose another {flag}.")
