"""Atomic writes: nothing half-written is ever left where a reader expects a whole file.

Temporary files and folders are created private (0600 / 0700) by `tempfile`; before they are
renamed into place they (and everything in a folder) get the permissions an ordinary `open` /
`mkdir` would have given them under the process umask, so a model saved on a shared machine is readable by whoever the umask
allows.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process umask (read from /proc where possible, since setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_created(path: str | os.PathLike, directory: bool) -> None:
    """Give a temporary file or folder the mode `open`/`mkdir` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def tree_as_created(root: str | os.PathLike) -> None:
    """`_as_created` on a folder and everything in it (some writers, e.g. transformers' safetensors
    shards, go through private temporary files too); executable files keep their execute bits."""
    mask, root = current_umask(), Path(root)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        else:
            exe = p.stat().st_mode & 0o111
            os.chmod(p, (0o666 | (0o111 if exe else 0)) & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the real suffix stays last: writers such as matplotlib pick the format from it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _as_created(tmp, directory=False)  # after writing: some writers (safetensors) replace the file
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`.

    With `overwrite`, an existing `target` is replaced only after the new one is complete, and
    never when it is (or contains) the working or home directory.
    """
    target = Path(target)
    if target.exists():
        if not overwrite:
            from ..errors import ShearkitError

            raise ShearkitError(f"{target} already exists; choose another path or pass --overwrite.")
        from .guard import refuse_unsafe_removal

        refuse_unsafe_removal(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tree_as_created(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
