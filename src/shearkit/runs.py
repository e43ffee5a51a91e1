"""Run directories: every command that produces something writes one.

A run directory holds the resolved recipe (`recipe.yaml`), `metrics.json`, a log (`run.log`),
the environment (`env.json`: versions, device, seed) and a marker, `.shearkit-run`, that says
shearkit created it and whether the run finished (`running`, `failed`, `interrupted`,
`complete`). An existing, non-empty directory is reused only in two cases: a run that stopped
before writing any result (only its recipe, environment and log are there) is replaced by the
rerun, and `--overwrite` replaces a directory that carries the marker (or, written before the
marker existed, shearkit's `run.log` and `env.json`), unless it is (or holds) the working
directory, a home directory or an input of the run.

While a `RunDir` is open its process holds an exclusive lock (`flock`) on `.shearkit-run.lock` in
the directory, taken before anything in it is read, deleted or written: a second shearkit process
given the same directory is refused at once instead of interleaving its files with the first's. The
system drops the lock when its process ends, however it ends (a SIGKILL leaves no stale lock); the
lock file is removed when the run directory is closed, and kept by `--overwrite` and reruns.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import ShearkitError
from .io.atomic import write_json, write_text
from .io.guard import refuse_unsafe_removal

MARKER = ".shearkit-run"
LOCK = ".shearkit-run.lock"  # held (flock) by the process writing the run directory
# what a run writes before it has any result; a stopped run holding only these is replaced on a rerun
BOOKKEEPING = frozenset({MARKER, LOCK, "recipe.yaml", "env.json", "run.log"})


def default_run_dir(command: str) -> Path:
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def environment(device: str | None = None, seed: int | dict[str, int] | None = None) -> dict[str, Any]:
    """Versions of the libraries that change results, the device, and the seeds (`seed` may be the
    recipe's `Recipe.seeds()`: env.json keeps them as `seeds` and their common value as `seed`)."""
    seeds = seed if isinstance(seed, dict) else {} if seed is None else {"seed": seed}
    seed = next(iter(set(seeds.values()))) if len(set(seeds.values())) == 1 else None
    from importlib import metadata

    versions = {}
    for pkg in ("shearkit", "torch", "transformers", "peft", "accelerate", "lm_eval", "safetensors", "datasets"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
           "device": device, "seed": seed, "seeds": seeds, "argv": sys.argv,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import torch

        env["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        env["threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return env


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker of a shearkit run directory, or None when `path` is not one."""
    p = Path(path) / MARKER
    try:
        marker = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _legacy_run_dir(path: Path) -> bool:
    """True for a run directory written before the marker existed: its `run.log` and shearkit's `env.json`."""
    try:
        env = json.loads((path / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (path / "run.log").is_file() and isinstance(env, dict) and "shearkit" in (env.get("versions") or {})


def _writer_alive(marker: dict) -> bool:
    """True when the marker's process is still running on this machine (and is not this process)."""
    pid = marker.get("pid")
    if marker.get("status") != "running" or not isinstance(pid, int) or pid == os.getpid():
        return False
    if marker.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


# run directories this process holds the lock of: (st_dev, st_ino) of the directory -> [lock fd, users]
# (a second RunDir of the same directory in this process shares the lock, as the marker always allowed)
_HELD: dict[tuple[int, int], list] = {}
_HELD_GUARD = threading.Lock()


class _Busy(Exception):
    """The lock of a run directory is held by another process."""


def _take_lock(path: Path) -> int | None:
    """Lock `path/LOCK` (created if needed) for this process; return its descriptor, None where the file
    system cannot lock (then only the marker guards the directory). Raises `_Busy` when another process
    holds it. A lock file removed by its holder while we waited on it is not taken: we lock the one at
    the path."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not a POSIX system
        return None
    lock = path / LOCK
    while True:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise _Busy from None
            # ENOLCK, EOPNOTSUPP: a file system without locks
            logging.getLogger("shearkit").warning("cannot lock %s (%s); only its marker guards it", lock, e)
            return None
        if _same_file(fd, lock):
            return fd
        os.close(fd)  # its holder removed it (the run ended) between our open and our lock: again


def _same_file(fd: int, path: Path) -> bool:
    """True when the open file `fd` is the file at `path` (not one removed, or replaced, since)."""
    try:
        st, own = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def recipe_inputs(recipe) -> list[str]:
    """Paths a recipe reads (model, data files, data directories), which `--overwrite` must never delete."""
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and Path(v).expanduser().exists():
            found.append(v)

    walk({k: v for k, v in recipe.to_dict().items() if k not in ("out", "name")})  # not the run's own folder
    return found


def _default_inputs() -> list[str]:
    """Inputs of every run: the data directory from the environment and shearkit's model cache."""
    from .models.builtin import cache_root

    return [p for p in (os.environ.get("SHEARKIT_DATA"), str(cache_root())) if p]


# recipe keys a resumed run may change: where the run directory is and what it is called
RESUME_FREE_KEYS = ("out", "name")


def check_same_recipe(path: str | os.PathLike, recipe) -> None:
    """Refuse to continue the run in `path` with a recipe other than the one it was started with
    (its `recipe.yaml`; a run stopped before writing one may go on with any), naming every key that
    differs with its old and new value. The checkpoints of every stage were written under the old
    recipe, so going on under another would end in a model neither recipe describes."""
    import yaml

    from .io.stage_state import differing_keys, flatten

    f = Path(path) / "recipe.yaml"
    try:
        old = yaml.safe_load(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        old = e
    if not isinstance(old, dict):
        raise ShearkitError(f"Cannot resume {path}: its recipe.yaml cannot be read as a recipe "
                            f"({' '.join(str(old).split())[:200]}); start "
                            "a new run (another --out, or --overwrite).") from None
    new = yaml.safe_load(recipe.to_yaml())
    old, new = ({k: v for k, v in d.items() if k not in RESUME_FREE_KEYS} for d in (old, new))
    changed = differing_keys(old, new)
    if not changed:
        return
    a, b = flatten(old), flatten(new)

    def show(d: dict, k: str) -> str:
        return repr(d[k]) if k in d else "(not set)"

    shown = [f"{k}: {show(a, k)} -> {show(b, k)}" for k in changed[:8]]
    more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    raise ShearkitError(f"Cannot resume {path} with another recipe: {'; '.join(shown)}{more}. Resume with the "
                        "command and options the run was started with (its recipe is in recipe.yaml), or start a "
                        "new run (another --out, or --overwrite).")


def process_rank() -> int:
    """This process's rank under a launcher (`accelerate launch` and torchrun set RANK), 0 otherwise."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RunDir:
    """A run directory being written; use it as a context manager so the marker records how the run ended.

    Under a launcher with several processes only the main process (rank 0) writes it: the others get a
    follower (`writer` False) that neither locks, clears nor writes anything, so that the same command
    runs in every process (the Trainer's checkpoints and logs are the main process's too).

    Args:
        path: the directory (default `runs/<command>-<timestamp>`).
        command: the command writing it (recorded in the marker).
        overwrite: replace an existing run directory (only one shearkit created; see the module docstring).
        reuse: continue in an existing run directory, keeping its files (e.g. `recover --resume`).
        inputs: paths the command reads; `--overwrite` refuses a directory that is or holds one of them.
        recipe: with `reuse`, the recipe of the continuing run: one that differs from the recipe the
            directory was started with (`recipe.yaml`) is refused, naming the differing keys.
    """

    def __init__(self, path: str | os.PathLike | None, command: str, overwrite: bool = False,
                 reuse: bool = False, inputs: Iterable[str | os.PathLike | None] = (), recipe=None):
        self.path = Path(path).expanduser() if path else default_run_dir(command)
        self.command = command
        self._lock_key: tuple[int, int] | None = None
        self._handler: logging.Handler | None = None
        self.logger = logging.getLogger("shearkit")
        self.writer = process_rank() == 0
        if not self.writer:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ShearkitError(f"{self.path} is a file, not a run directory; choose another --out.")
        try:
            self.path.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        except OSError as e:
            raise ShearkitError(f"Cannot create the run directory {self.path}: {e.strerror or e}; choose another "
                                "--out (a folder you can write, on a disk with room).") from None
        try:
            self._lock()  # before anything in the directory is read, deleted or written
        except BaseException:
            if created:
                try:
                    self.path.rmdir()
                except OSError:
                    pass
            raise
        try:
            marker = read_marker(self.path)
            if marker is not None and _writer_alive(marker):
                raise ShearkitError(f"Run directory {self.path} is being written by another shearkit process (pid "
                                    f"{marker['pid']}, since {marker.get('created')}); wait for it or choose "
                                    f"another --out. If that process is gone, delete {self.path / MARKER}.")
            if reuse and recipe is not None:
                check_same_recipe(self.path, recipe)
            if any(e.name != LOCK for e in self.path.iterdir()) and not reuse:
                self._clear(marker, overwrite, [*inputs, *_default_inputs()])
            self._created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._mark("running")
            handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        except BaseException as e:
            self._unlock()
            if created:  # a folder this refused run made: leave nothing behind
                shutil.rmtree(self.path, ignore_errors=True)
            if isinstance(e, OSError):  # the log file could not be created (a full disk, ...)
                raise ShearkitError(f"Cannot write the run directory {self.path}: {e.strerror or e}; free space "
                                    "or choose another --out.") from e
            raise
        self.logger = logging.getLogger("shearkit")
        self._handler = handler
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(self._handler)
        self.logger.setLevel(logging.INFO)

    def _lock(self) -> None:
        """Take the directory's lock, or refuse: another process is writing it."""
        st = self.path.stat()
        key = (st.st_dev, st.st_ino)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None and held[0] is not None and not _same_file(held[0], self.path / LOCK):
                os.close(held[0])  # a folder removed (never closed) and another made with its inode number
                del _HELD[key]
                held = None
            if held is not None:  # this process already writes it
                held[1] += 1
                self._lock_key = key
                return
            try:
                fd = _take_lock(self.path)
            except _Busy:
                marker = read_marker(self.path) or {}
                who = (f" (pid {marker['pid']} on {marker.get('host')}, since {marker.get('created')})"
                       if marker.get("status") == "running" and marker.get("pid") else "")
                raise ShearkitError(f"Run directory {self.path} is being written by another shearkit process{who}; "
                                    "two runs must not write the same directory. Wait for that run to end, or "
                                    "choose another --out.") from None
            except OSError as e:
                raise ShearkitError(f"Cannot lock the run directory {self.path}: {e.strerror or e}; choose another "
                                    "--out (a folder you can write).") from None
            _HELD[key] = [fd, 1]
            self._lock_key = key

    def _unlock(self) -> None:
        """Release the directory's lock (the last user in this process removes the lock file, then unlocks)."""
        key, self._lock_key = self._lock_key, None
        if key is None:
            return
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[key]
            fd = held[0]
            if fd is None:
                return
            try:
                if _same_file(fd, self.path / LOCK):
                    (self.path / LOCK).unlink()
            except OSError:
                pass
            os.close(fd)

    def _clear(self, marker: dict | None, overwrite: bool, inputs: list) -> None:
        """Empty an existing directory before the run starts, or refuse (see the module docstring)."""
        entries = [e for e in self.path.iterdir() if e.name != LOCK]  # the lock stays: this process holds it
        unfinished = marker is not None and marker.get("status") != "complete"
        if unfinished and {e.name for e in entries} <= BOOKKEEPING:
            for e in entries:  # a run that stopped before any result: remove only its own files
                e.unlink()
            return
        if not overwrite:
            if unfinished:
                raise ShearkitError(f"Run directory {self.path} holds an unfinished {marker.get('command')} run "
                                    f"({marker.get('status')}) with results in it; pass --overwrite to replace it, "
                                    "--resume to continue it (prune, run, recover), or choose another --out.")
            raise ShearkitError(f"Run directory {self.path} already exists and is not empty; "
                                "choose another --out or pass --overwrite.")
        refuse_unsafe_removal(self.path, inputs)
        if marker is None and not _legacy_run_dir(self.path):
            raise ShearkitError(f"{self.path} is not a shearkit run directory (it has no {MARKER} file), so "
                                "--overwrite will not delete it; choose another --out, or delete it yourself.")
        if self.path.is_symlink():
            raise ShearkitError(f"{self.path} is a symbolic link; --overwrite deletes only a real run directory. "
                                "Give the folder it points to as --out.")
        for e in entries:  # everything but the lock file
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()

    def _mark(self, status: str) -> None:
        if not self.writer:
            return
        write_json(self.path / MARKER, {"shearkit_run": 1, "command": self.command, "status": status,
                                        "pid": os.getpid(), "host": socket.gethostname(),
                                        "created": self._created, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._mark("complete")
            else:
                self._mark("failed" if issubclass(exc_type, Exception) else "interrupted")
                self.log(f"stopped: {exc_type.__name__}: {exc}")
        finally:
            self.close()

    def log(self, msg: str) -> None:
        self.logger.info(msg)

    def write_recipe(self, recipe) -> None:
        if self.writer:
            write_text(self.path / "recipe.yaml", recipe.to_yaml())

    def write_env(self, device: str | None = None, seed: int | dict[str, int] | None = None) -> None:
        if self.writer:
            write_json(self.path / "env.json", environment(device, seed))

    def write_metrics(self, metrics: dict) -> None:
        if self.writer:
            write_json(self.path / "metrics.json", metrics)

    def read_metrics(self) -> dict:
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def close(self) -> None:
        """Detach the log file and release the directory's lock (the marker keeps saying `running`
        unless the run ends through `with`)."""
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        self._unlock()
