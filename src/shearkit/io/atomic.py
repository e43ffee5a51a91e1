"""Atomic writes: nothing half-written is ever left where a reader expects a whole file.

A file (`atomic_file`) or a folder (`atomic_dir`) is written under a temporary name beside its
target, flushed to disk (`fsync` of every file, then of the folders holding them) and renamed over
the target; the folder holding the target is synced after the rename, so the new name survives a
crash of the machine. An existing folder is swapped for the new one in one step where the system
can (Linux `renameat2(RENAME_EXCHANGE)`), else renamed aside and back on failure.

A write that fails (disk full, quota, I/O error, no permission: an `OSError` anywhere inside the
block, also the ones safetensors and tokenizers raise from Rust) removes the temporary file or
folder, leaves the target as it was and raises `WriteFailed` (a `ShearkitError`) naming the target,
the system's reason and what to do. Anything else raised inside the block (a `KeyboardInterrupt`,
a `ShearkitError`) propagates unchanged, after the temporary is removed.

Temporary files and folders are created private (0600 / 0700) by `tempfile`; before they are
renamed into place they (and everything in a folder) get the permissions an ordinary `open` /
`mkdir` would have given them under the process umask, so a model saved on a shared machine is readable by whoever the umask
allows.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import ShearkitError


class WriteFailed(ShearkitError):
    """A file or folder could not be written; what was at its path before is unchanged.

    Attributes:
        path: the file or folder that was being written.
        os_error: the `OSError` that stopped the write (its `errno` and `strerror` say why).
        kept: True when what was at `path` before is still there, False when nothing was (and
            nothing is), None when the new file is in place and only syncing its folder failed.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, os_error: OSError | None = None,
                 kept: bool | None = True):
        super().__init__(message)
        self.path = path
        self.os_error = os_error
        self.kept = kept


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(exc: BaseException) -> OSError | None:
    """The `OSError` behind a failed write, or None when `exc` is not one (then it must propagate as is).

    Besides `OSError` itself: a nested `WriteFailed`, and the errors safetensors (`SafetensorError`) and
    tokenizers (a plain `Exception`) raise from Rust, whose message ends in `(os error N)`."""
    if isinstance(exc, WriteFailed):
        return exc.os_error
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, ShearkitError) or not isinstance(exc, Exception):
        return None
    if type(exc).__name__ == "SafetensorError" or type(exc) is Exception:
        m = _RUST_OS_ERROR.search(str(exc))
        if m:
            n = int(m.group(1))
            return OSError(n, os.strerror(n))
    return None


def _advice(err: OSError, parent: Path, instead: str) -> str:
    code = err.errno
    if code == errno.ENOSPC:
        return f"Free space on the disk that holds {parent}, or choose {instead} on a disk with room, and run again."
    if code == getattr(errno, "EDQUOT", None):
        return (f"Free space within your disk quota on {parent} (or ask for a larger one), or choose {instead}, "
                "and run again.")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Make {parent} writable for this user (the disk may be read-only), or choose {instead}."
    return f"Check the disk that holds {parent} (the system log may say more), or choose {instead}, and run again."


def write_error(path: str | os.PathLike, err: OSError, *, kept: bool | None, detail: str = "",
                instead: str = "another --out") -> WriteFailed:
    """The `WriteFailed` for a failed write of `path`.

    `kept`: True when what was at `path` before is still there, False when there was nothing (and
    nothing is there now), None when `path` was already replaced (only syncing it to disk failed).
    `detail`: the file inside a folder being written that failed; `instead`: the other place to name."""
    path = Path(path)
    reason = err.strerror or str(err) or type(err).__name__
    where = f" (writing {detail})" if detail else ""
    if kept is None:
        state = f"{path} has been written, but may not survive a crash of the machine."
    elif kept:
        state = f"The previous {path} is unchanged."
    else:
        state = f"Nothing was written at {path}."
    parent = Path(os.path.abspath(path)).parent
    return WriteFailed(f"Could not write {path}: {reason}{where}. {_advice(err, parent, instead)} {state}",
                       path=path, os_error=err, kept=kept)


def _inner_name(exc: BaseException, err: OSError, tmp: Path | None) -> str:
    """Which file inside a temporary folder a write failed on, for the message ('' when unknown)."""
    inner = exc.path if isinstance(exc, WriteFailed) else err.filename
    if not inner or tmp is None:
        return ""
    try:
        return Path(inner).relative_to(tmp).as_posix()
    except ValueError:
        return ""


# -- flushing to disk ------------------------------------------------------------------------------

def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed, removed in it) to disk. A system that cannot
    sync folders (EINVAL) is skipped; every other error is raised."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """`fsync_file` on every file under `root`, then `fsync_dir` on every folder, deepest first."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(folder)


# -- swapping a folder for another -----------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = False  # not looked up yet


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system or
    the file system cannot (then nothing was changed)."""
    global _renameat2
    if _renameat2 is False:
        _renameat2 = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (AttributeError, OSError):
                pass
    if _renameat2 is None:
        return False
    import ctypes

    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _aside(target: Path, what: str) -> Path:
    """A free name beside `target` for a folder moved out of the way."""
    import secrets

    return target.with_name(f".{target.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _swap_in(new: Path, target: Path) -> Path:
    """Put folder `new` at `target` in place of what is there; return the path now holding the previous
    one (for the caller to remove). If this fails, `target` is as it was."""
    if _exchange(new, target):
        return new
    old = _aside(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the previous one back
        raise
    return old


def _remove(p: Path) -> None:
    """Remove a file, link or folder, ignoring errors (a leftover temporary)."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


# -- permissions -----------------------------------------------------------------------------------

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


# -- the writers -----------------------------------------------------------------------------------

@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is synced and renamed over `path`.

    Raises `WriteFailed` when writing fails with an OS error (see the module docstring)."""
    path = Path(path)
    existed = os.path.lexists(path)
    tmp: Path | None = None
    replaced = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the real suffix stays last: writers such as matplotlib pick the format from it
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _as_created(tmp, directory=False)  # after writing: some writers (safetensors) replace the file
        fsync_file(tmp)
        os.replace(tmp, path)
        replaced, tmp = True, None
        fsync_dir(path.parent)
    except BaseException as e:
        err = os_error_of(e)
        if err is None:
            raise
        raise write_error(path, err, kept=None if replaced else existed) from e
    finally:
        if tmp is not None:
            _remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success sync it and rename it to `target`.

    With `overwrite`, an existing `target` is replaced only after the new one is complete, and
    never when it is (or contains) the working or home directory. Raises `WriteFailed` when
    writing fails with an OS error (see the module docstring).
    """
    target = Path(target)
    if target.exists():
        if not overwrite:
            raise ShearkitError(f"{target} already exists; choose another path or pass --overwrite.")
        from .guard import refuse_unsafe_removal

        refuse_unsafe_removal(target)
    existed = os.path.lexists(target)
    tmp: Path | None = None
    replaced = False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        yield tmp
        tree_as_created(tmp)
        fsync_tree(tmp)
        previous: Path | None = None
        if os.path.lexists(target):
            previous = _swap_in(tmp, target)
        else:
            os.replace(tmp, target)
        tmp = None
        try:
            fsync_dir(target.parent)
        except BaseException:  # the new name may not be on disk: put the previous state back
            replaced = True
            if previous is None:
                tmp = _aside(target, "tmp")
                os.replace(target, tmp)
            else:
                tmp = _swap_in(previous, target)
            replaced = False
            raise
        if previous is not None:
            _remove(previous)
    except BaseException as e:
        err = os_error_of(e)
        inner = _inner_name(e, err, tmp) if err is not None else ""
        if tmp is not None:
            _remove(tmp)
            tmp = None
        if err is None:
            raise
        raise write_error(target, err, kept=None if replaced else existed, detail=inner) from e
    finally:
        if tmp is not None:
            _remove(tmp)
