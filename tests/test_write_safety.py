"""Writes cannot corrupt: a model, a checkpoint, a plan or a run's metrics are written to a temporary
path, synced and renamed. An OS error injected at each low-level write call of a save (and a disk that
fills up after its first M bytes) leaves the previous good state loadable, no temporary behind, and
an error that names the path and the system's reason. The input model directory is never modified
by any command, and two processes are never let write the same run directory."""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import shearkit as sk
from shearkit.errors import ShearkitError
from shearkit.io import atomic
from shearkit.io.save import save
from shearkit.runs import LOCK, MARKER, RunDir, read_marker

from conftest import make_tiny

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


# -- injecting failures into the low-level write calls ---------------------------------------------

class Disk:
    """Counts the low-level write calls made while it is installed (`faults`), and fails them: the
    `fail_at`-th call raises OSError(ENOSPC), or, with `room`, every write after the first `room`
    bytes does (a disk that fills up: the write that crosses the limit writes what fits first).

    The calls: opening a file for writing (builtins/io `open`, `os.open` with a write flag), each
    `write` on such a file, `os.write`, creating a folder, `os.replace` / `os.rename` / `os.link`,
    `os.fsync`, the exchange of two folders in `shearkit.io.atomic`, safetensors' `save_file` (through
    every module that imported it) and the tokenizers library's `Tokenizer.save` (both write from Rust,
    so each counts as one call; with `room` they write their bytes through a counted file)."""

    def __init__(self, fail_at: int | None = None, room: int | None = None):
        self.fail_at, self.room = fail_at, room
        self.calls: list[str] = []
        self.written = 0

    def _full(self, what: str) -> OSError:
        return OSError(errno.ENOSPC, FULL, what)

    def call(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self._full(what)

    def take(self, n: int) -> int:
        """Bytes of a write of `n` the disk still takes (the rest fails)."""
        if self.room is None:
            return n
        ok = max(0, min(n, self.room - self.written))
        self.written += ok
        return ok


class _File:
    """A file opened for writing, its writes counted and failed by a `Disk`."""

    def __init__(self, f, disk: Disk, name: str):
        self._f, self._disk, self._name = f, disk, name

    def write(self, data):
        self._disk.call(f"write {self._name}")
        n = len(data.encode("utf-8") if isinstance(data, str) else data)
        ok = self._disk.take(n)
        if ok < n:
            if ok:
                self._f.write(data[:ok])  # what fits (for text, about that many characters)
            self._f.flush()
            raise self._disk._full(self._name)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@contextmanager
def installed(disk: Disk, monkeypatch):
    """Route the write calls through `disk` while the block runs."""
    import safetensors.torch
    import tokenizers

    real_open, real_os_open, real_os_write = builtins.open, os.open, os.write
    real_mkdir, real_replace, real_rename, real_link = os.mkdir, os.replace, os.rename, os.link
    real_fsync, real_exchange = os.fsync, atomic._exchange
    real_save_file, real_tok_save = safetensors.torch.save_file, tokenizers.Tokenizer.save

    def open_(file, mode="r", *a, **kw):
        if not any(c in mode for c in "wax+"):
            return real_open(file, mode, *a, **kw)
        disk.call(f"open {file}")
        return _File(real_open(file, mode, *a, **kw), disk, str(file))

    def os_open(path, flags, *a, **kw):
        if flags & _WRITE_FLAGS:
            disk.call(f"os.open {path}")
        return real_os_open(path, flags, *a, **kw)

    def os_write(fd, data):
        disk.call("os.write")
        ok = disk.take(len(data))
        if ok < len(data):
            if ok:
                real_os_write(fd, data[:ok])
            raise disk._full("os.write")
        return real_os_write(fd, data)

    def mkdir(path, *a, **kw):
        if not os.path.exists(path):  # makedirs(exist_ok=True) of a folder that is there writes nothing
            disk.call(f"mkdir {path}")
        return real_mkdir(path, *a, **kw)

    def counted(real, what):
        def f(*a, **kw):
            disk.call(f"{what} {a[-1] if a else ''}")
            return real(*a, **kw)
        return f

    def through_file(path, data: bytes) -> None:
        with open_(path, "wb") as f:
            f.write(data)

    def save_file(tensors, filename, metadata=None):
        disk.call(f"save_file {filename}")
        if disk.room is None:
            return real_save_file(tensors, filename, metadata=metadata)
        through_file(filename, safetensors.torch.save(tensors, metadata=metadata))

    def tok_save(self, path, pretty=True):
        disk.call(f"Tokenizer.save {path}")
        if disk.room is None:
            return real_tok_save(self, path, pretty)
        through_file(path, self.to_str(pretty).encode("utf-8"))

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", open_)
        m.setattr(io, "open", open_)
        m.setattr(os, "open", os_open)
        m.setattr(os, "write", os_write)
        m.setattr(os, "mkdir", mkdir)
        m.setattr(os, "replace", counted(real_replace, "replace"))
        m.setattr(os, "rename", counted(real_rename, "rename"))
        m.setattr(os, "link", counted(real_link, "link"))
        m.setattr(os, "fsync", counted(real_fsync, "fsync"))
        m.setattr(atomic, "_exchange", counted(real_exchange, "exchange"))
        m.setattr(tokenizers.Tokenizer, "save", tok_save)
        for mod in list(sys.modules.values()):  # every module that did `from safetensors.torch import save_file`
            for name, value in list(getattr(mod, "__dict__", {}).items()):
                if value is real_save_file:
                    m.setattr(mod, name, save_file)
        yield disk


def tree(d: Path) -> dict[str, str]:
    """Every file under `d` (relative name -> sha256 of its bytes)."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def assert_nothing_beside(target: Path) -> None:
    """Only `target` in its folder: no temporary file or folder left by a failed write."""
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def count_calls(fn, monkeypatch) -> list[str]:
    with installed(Disk(), monkeypatch) as disk:
        fn()
    return disk.calls


def fails_at_each_call(n: int, write, check, monkeypatch, survives=(), recovered=None) -> None:
    """For k = 1..n: `write()` with the k-th write call failing must raise a ShearkitError, then `check(message)`.

    A failed call of a kind in `survives` may instead be worked around (the write then succeeds and
    `recovered()` checks what it wrote)."""
    for k in range(1, n + 1):
        with installed(Disk(fail_at=k), monkeypatch) as disk:
            try:
                write()
            except ShearkitError as e:
                msg = str(e)
            else:
                assert disk.calls[k - 1].split()[0] in survives, f"no error with call {k} failing: {disk.calls[k - 1]}"
                recovered()
                continue
        assert len(disk.calls) >= k, f"call {k} of {n} never came"
        check(msg)


# -- 1. fsync before the rename, the folder after it ---------------------------------------------

@pytest.fixture
def sync_log(monkeypatch):
    """What gets fsynced (by path) and renamed, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, atomic._exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, **kw):
        events.append(("rename", str(b)))
        return real_replace(a, b, **kw)

    def exchange(a, b):
        events.append(("rename", str(b)))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(atomic, "_exchange", exchange)
    return events


def test_files_and_folders_are_synced_before_their_rename_and_the_parent_after(tmp_path, sync_log):
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    rename = sync_log.index(("rename", str(tmp_path / "a.json")))
    assert any(Path(p).name.startswith(".a.tmp-") for e, p in sync_log[:rename] if e == "fsync")  # the file
    assert ("fsync", str(tmp_path)) in sync_log[rename:]  # then the folder that holds its new name
    sync_log.clear()
    for replace in (False, True):  # a new folder, then one replacing it
        with atomic.atomic_dir(tmp_path / "d", overwrite=replace) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "w.bin").write_bytes(b"1" * 10)
            (tmp / "sub" / "c.json").write_text("{}")
        rename = sync_log.index(("rename", str(tmp_path / "d")))
        before = {Path(p).relative_to(tmp).as_posix() for e, p in sync_log[:rename] if e == "fsync"}
        assert before >= {"w.bin", "sub/c.json", "sub", "."}, before
        assert ("fsync", str(tmp_path)) in sync_log[rename:]
        sync_log.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


def test_a_folder_sync_the_system_refuses_is_skipped_but_other_sync_errors_are_not(tmp_path, monkeypatch):
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument"))
                        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else real(fd))
    atomic.write_text(tmp_path / "ok.txt", "fine")  # the folder cannot be synced here: not an error
    assert (tmp_path / "ok.txt").read_text() == "fine"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(ShearkitError, match=r"Could not write .*b\.txt: Input/output error.*Nothing was written"):
        atomic.write_text(tmp_path / "b.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.txt"]


# -- 2. a failed write says what happened, removes its temporary and keeps the previous state ----

def test_interrupts_and_other_errors_propagate_unchanged_and_leave_no_temporary(tmp_path):
    atomic.write_text(tmp_path / "f.txt", "old")
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("old")
    for exc in (KeyboardInterrupt(), ValueError("a bug"), ShearkitError("a user error")):
        with pytest.raises(type(exc)) as e:
            with atomic.atomic_file(tmp_path / "f.txt") as tmp:
                tmp.write_text("new")
                raise exc
        assert e.value is exc
        with pytest.raises(type(exc)) as e:
            with atomic.atomic_dir(tmp_path / "d", overwrite=True) as tmp:
                (tmp / "x").write_text("new")
                raise exc
        assert e.value is exc
    assert (tmp_path / "f.txt").read_text() == "old" and (tmp_path / "d" / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]


def test_errors_the_rust_writers_raise_are_reported_as_failed_writes(tmp_path):
    """safetensors and tokenizers raise their own exceptions for an OS error; they are write failures too."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models

    with pytest.raises(atomic.WriteFailed, match=r"Could not write .*m\.safetensors: No such file or directory"):
        with atomic.atomic_file(tmp_path / "m.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp.parent / "missing" / tmp.name))
    with pytest.raises(atomic.WriteFailed, match=r"Could not write .*tok: No such file or directory\. "):
        with atomic.atomic_dir(tmp_path / "tok") as tmp:
            Tokenizer(models.BPE()).save(str(tmp / "missing" / "tokenizer.json"))
    assert list(tmp_path.iterdir()) == []


def test_each_kind_of_os_error_says_what_to_do(tmp_path):
    for code, says in ((errno.ENOSPC, "Free space on the disk"), (errno.EDQUOT, "disk quota"),
                       (errno.EACCES, "writable"), (errno.EROFS, "writable"), (errno.EIO, "Check the disk")):
        with pytest.raises(atomic.WriteFailed) as e:
            with atomic.atomic_file(tmp_path / "f.json"):
                raise OSError(code, os.strerror(code))
        msg = str(e.value)
        assert str(tmp_path / "f.json") in msg and os.strerror(code) in msg and says in msg and "--out" in msg, msg
        assert e.value.os_error.errno == code and e.value.path == tmp_path / "f.json"


@pytest.fixture
def models_to_save(tiny_tokenizer):
    """A good model (per-layer widths, a structured plan) and the one that fails to replace it
    (other weights, an unstructured plan with masks)."""
    good = make_tiny("llama")
    good_plan = sk.prune(good, None, "structured-magnitude", 0.3, allocation="global")
    new = make_tiny("llama", seed=1)
    new_plan = sk.prune(new, None, "magnitude", 0.5)
    return good, good_plan, new, new_plan, tiny_tokenizer


def logits_of(path: Path) -> torch.Tensor:
    model, _ = sk.load(path, device="cpu")
    with torch.no_grad():
        return model(IDS).logits


def test_a_save_failing_at_any_write_call_leaves_the_previous_model(tmp_path, models_to_save, monkeypatch):
    good, good_plan, new, new_plan, tok = models_to_save
    target = tmp_path / "out" / "m"
    save(good, tok, target, plan=good_plan)
    before, ref = tree(target), logits_of(target)
    (tmp_path / "probe").mkdir()
    save(good, tok, tmp_path / "probe" / "m", plan=good_plan)
    calls = count_calls(lambda: save(new, tok, tmp_path / "probe" / "m", plan=new_plan, overwrite=True), monkeypatch)
    kinds = {c.split()[0] for c in calls}
    assert {"open", "write", "save_file", "Tokenizer.save", "fsync", "exchange"} <= kinds, kinds
    assert len(calls) > 30

    def check(msg: str) -> None:
        assert str(target) in msg and FULL in msg and f"The previous {target} is unchanged" in msg, msg
        assert tree(target) == before
        assert_nothing_beside(target)
        torch.testing.assert_close(logits_of(target), ref, rtol=0, atol=0)

    fails_at_each_call(len(calls), lambda: save(new, tok, target, plan=new_plan, overwrite=True), check, monkeypatch)
    save(new, tok, target, plan=new_plan, overwrite=True)  # the same save, nothing failing, replaces it
    assert tree(target) != before and sk.Plan.load(target).method == "magnitude"
    with torch.no_grad():
        torch.testing.assert_close(logits_of(target), new(IDS).logits, rtol=0, atol=0)
    assert_nothing_beside(target)


def test_a_first_save_failing_at_any_write_call_leaves_nothing(tmp_path, models_to_save, monkeypatch):
    _, _, new, new_plan, tok = models_to_save
    target = tmp_path / "out" / "m"
    target.parent.mkdir()
    calls = count_calls(lambda: save(new, tok, tmp_path / "probe", plan=new_plan), monkeypatch)

    def check(msg: str) -> None:
        assert str(target) in msg and FULL in msg and f"Nothing was written at {target}" in msg, msg
        assert list(target.parent.iterdir()) == []

    fails_at_each_call(len(calls), lambda: save(new, tok, target, plan=new_plan), check, monkeypatch)


def test_a_disk_that_fills_up_leaves_the_previous_model(tmp_path, models_to_save, monkeypatch):
    good, good_plan, new, new_plan, tok = models_to_save
    target = tmp_path / "out" / "m"
    save(good, tok, target, plan=good_plan)
    before, ref = tree(target), logits_of(target)
    with installed(Disk(room=1 << 40), monkeypatch) as disk:  # the bytes a save writes
        save(new, tok, tmp_path / "probe", plan=new_plan)
    total = disk.written
    assert total > 100_000
    for room in (0, 1, 100, 5_000, total // 2, total - 1):
        with installed(Disk(room=room), monkeypatch):
            with pytest.raises(ShearkitError) as e:
                save(new, tok, target, plan=new_plan, overwrite=True)
        assert str(target) in str(e.value) and FULL in str(e.value)
        assert tree(target) == before
        assert_nothing_beside(target)
        torch.testing.assert_close(logits_of(target), ref, rtol=0, atol=0)
    with installed(Disk(room=total), monkeypatch):  # exactly enough room
        save(new, tok, target, plan=new_plan, overwrite=True)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(target), new(IDS).logits, rtol=0, atol=0)


def test_a_folder_is_put_back_where_it_cannot_be_swapped_in_one_step(tmp_path, monkeypatch):
    """Without renameat2 the previous folder is renamed aside and the new one in; a failure of any
    call (either rename included) leaves the previous one in place."""
    monkeypatch.setattr(atomic, "_renameat2", None)  # as on a system without it
    target = tmp_path / "out" / "d"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "x").write_text("old")
    before = tree(target)

    def write(where: Path = target):
        with atomic.atomic_dir(where, overwrite=True) as tmp:
            (tmp / "x").write_text("new")
            (tmp / "y").write_text("new")

    (tmp_path / "probe").mkdir()
    write(tmp_path / "probe" / "d")
    calls = count_calls(lambda: write(tmp_path / "probe" / "d"), monkeypatch)
    assert [c.split()[0] for c in calls].count("replace") == 2, calls

    def check(msg: str) -> None:
        assert str(target) in msg and FULL in msg and "is unchanged" in msg, msg
        assert tree(target) == before
        assert_nothing_beside(target)

    fails_at_each_call(len(calls), write, check, monkeypatch)
    write()
    assert (target / "y").read_text() == "new"
    assert_nothing_beside(target)


def _checkpoint_parts(seed: int):
    """What a trainer checkpoints: adapter tensors, an AdamW state after a step, the trainer state."""
    g = torch.Generator().manual_seed(seed)
    adapter = {"layers.0.q.lora_A": torch.randn(4, 8, generator=g), "layers.0.q.lora_B": torch.randn(8, 4, generator=g)}
    p = torch.nn.Parameter(torch.randn(4, 4, generator=g))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.sum().backward()
    opt.step()
    return adapter, opt.state_dict(), {"losses": [1.0, 0.5 + seed], "eval": {}}


def test_a_checkpoint_failing_at_any_write_call_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from shearkit.recovery.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    root = tmp_path / "recovery"
    good = _checkpoint_parts(0)
    save_checkpoint(root, 2, *good, callbacks={"guard": {"best": torch.ones(3), "n": 1}})
    before = tree(root)
    ref = load_checkpoint(root / "checkpoint-2")
    new = _checkpoint_parts(1)

    def check_kept() -> None:
        assert tree(root) == before and [p.name for p in root.iterdir()] == ["checkpoint-2"]
        assert latest_checkpoint(root) == root / "checkpoint-2"
        back = load_checkpoint(root / "checkpoint-2")
        for k in ("adapter", "rng"):
            assert back[k].keys() == ref[k].keys() and all(torch.equal(back[k][n], ref[k][n]) for n in ref[k])
        assert back["state"] == ref["state"] and torch.equal(back["callbacks"]["guard"]["best"], torch.ones(3))

    for step in (2, 3):  # the same step again (a resumed run), then the next one
        target = root / f"checkpoint-{step}"
        probe = tmp_path / f"probe{step}"
        save_checkpoint(probe, 2, *good)
        n = len(count_calls(lambda: save_checkpoint(probe, step, *new), monkeypatch))
        assert n >= 10

        def check(msg: str) -> None:
            assert str(target) in msg and FULL in msg, msg
            check_kept()

        fails_at_each_call(n, lambda: save_checkpoint(root, step, *new), check, monkeypatch)
    with installed(Disk(room=1000), monkeypatch):
        with pytest.raises(ShearkitError, match=FULL):
            save_checkpoint(root, 3, *new)
    check_kept()


def test_metrics_plan_and_log_writes_failing_at_any_call_keep_the_previous_ones(tmp_path, monkeypatch):
    from shearkit.recovery.trainlog import TrainLog

    # metrics.json of a run directory
    with RunDir(tmp_path / "run", "eval") as run:
        run.write_metrics({"ppl": 1.0})
        names = sorted(p.name for p in run.path.iterdir())
        n = len(count_calls(lambda: run.write_metrics({"ppl": 2.0}), monkeypatch))
        run.write_metrics({"ppl": 1.0})

        def check_metrics(msg: str) -> None:
            assert str(run.path / "metrics.json") in msg and FULL in msg, msg
            assert sorted(p.name for p in run.path.iterdir()) == names  # no temporary left
            if "has been written" in msg:  # only the sync of the folder after the rename failed
                assert run.read_metrics() == {"ppl": 2.0}
                run.write_metrics({"ppl": 1.0})
            else:
                assert "is unchanged" in msg and run.read_metrics() == {"ppl": 1.0}

        fails_at_each_call(n, lambda: run.write_metrics({"ppl": 2.0}), check_metrics, monkeypatch)

    # plan.json with its masks: a failure leaves the previous plan and the previous masks, together
    model = make_tiny("llama")
    good_plan = sk.prune(model, None, "magnitude", 0.5)
    new_plan = sk.prune(make_tiny("llama", seed=1), None, "magnitude", 0.3)
    d = tmp_path / "plans"
    good_plan.save(d / "plan.json")
    before, good_bytes = tree(d), {p.name: p.read_bytes() for p in d.iterdir()}

    def put_back() -> None:  # (saving the plan again would write its masks' header in another order)
        for name, data in good_bytes.items():
            (d / name).write_bytes(data)
    good_plan.save(tmp_path / "probe" / "plan.json")
    calls = count_calls(lambda: new_plan.save(tmp_path / "probe" / "plan.json"), monkeypatch)
    assert {"link", "save_file", "exchange"} - {c.split()[0] for c in calls} == {"exchange"}, calls
    n = len(calls)

    def check_plan(msg: str) -> None:
        assert FULL in msg and str(d) in msg, msg
        if "has been written" in msg:  # plan.json is there, whole: the new plan with its masks
            assert sk.Plan.load(d).ratio_target == 0.3
            put_back()
        assert tree(d) == before
        back = sk.Plan.load(d)
        assert back.ratio_target == 0.5 and set(back.masks) == set(good_plan.masks)

    def recovered() -> None:  # no hard link for the previous masks: they were copied aside instead
        assert sk.Plan.load(d).ratio_target == 0.3 and sorted(p.name for p in d.iterdir()) == sorted(before)
        put_back()

    fails_at_each_call(n, lambda: new_plan.save(d / "plan.json"), check_plan, monkeypatch, survives=("link",),
                       recovered=recovered)

    # the training log: a failed append leaves the records before it, no torn line
    log = TrainLog(tmp_path / "train_log.jsonl")
    log.append({"step": 1, "loss": 1.0})
    text = (tmp_path / "train_log.jsonl").read_text()
    for room in (0, 5):
        with installed(Disk(room=room), monkeypatch):
            with pytest.raises(ShearkitError, match=f"train_log.jsonl: {FULL}"):
                log.append({"step": 2, "loss": 0.5})
        assert (tmp_path / "train_log.jsonl").read_text() == text and len(log.records) == 1
    log.append({"step": 2, "loss": 0.5})
    assert TrainLog(tmp_path / "train_log.jsonl", resume_step=5).records == [{"step": 1, "loss": 1.0},
                                                                              {"step": 2, "loss": 0.5}]


# -- 3. the input model directory is never modified ----------------------------------------------

def test_no_command_modifies_its_input_model(tmp_path, tiny_tokenizer, monkeypatch):
    """Every command that reads a model, run on a saved tiny model (and on a pruned one it wrote), leaves
    the model's folder with the same files, byte for byte."""
    from typer.testing import CliRunner

    from shearkit.cli import app

    base = save(make_tiny("llama"), tiny_tokenizer, tmp_path / "models" / "base")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. pruning makes language models smaller.\n" * 60)
    monkeypatch.chdir(tmp_path)
    inputs = {base: tree(base)}

    def invoke(*args) -> None:
        r = CliRunner().invoke(app, [str(a) for a in args])
        if r.exception and not isinstance(r.exception, SystemExit):
            raise r.exception
        assert r.exit_code == 0, r.output
        for d, files in inputs.items():
            assert tree(d) == files, f"`shearkit {args[0]}` changed {d}"
        assert os.listdir(base.parent) == ["base"]  # nor wrote beside it

    quick = ["--tasks", text, "--eval-seqlen", 16, "--limit", 1, "--no-dense-eval"]
    calib = ["--calib", text, "--calib-samples", 2, "--calib-seqlen", 16]
    invoke("prune", base, "--method", "wanda", "--ratio", 0.5, *calib, *quick, "--out", "runs/wanda")
    invoke("prune", base, "--method", "structured-magnitude", "--ratio", 0.3, *quick, "--save-format", "gguf",
           "--out", "runs/sm")
    pruned = tmp_path / "runs" / "wanda" / "model"
    inputs[pruned] = tree(pruned)  # a pruned model (plan.json and masks) as the input from here on
    for model in (base, pruned):
        invoke("eval", model, "--tasks", text, "--seqlen", 16, "--limit", 2, "--out", f"runs/eval-{model.name}")
        invoke("recover", model, "--data", text, "--steps", 2, "--batch-size", 2, "--seqlen", 16, "--save-every", 1,
               "--out", f"runs/rec-{model.name}")
        invoke("export", model, "--format", "gguf", "--out", f"{model.name}.gguf", "--outtype", "f32")
        invoke("graph", model, "--plot", f"{model.name}.png", "--json")
        invoke("generate", model, "the quick", "--max-new-tokens", 2, "--raw")
    invoke("analyze", base, "--ratio", 0.25, "--data", text, "--tokens", 64, "--seqlen", 32, "--out", "sens.json")
    invoke("extend", base, "--add-blocks", 1, "--start", 1, "--end", 1, "--rank", 4, "--steps", 1, "--data", text,
           "--set", "extend.train.seqlen=16", "--set", "extend.train.batch_size=2", *quick[:-1], "--no-dense-eval",
           "--out", "runs/extend")
    invoke("bench", base, "--vs", pruned, "--length", 8, "--decode-tokens", 2, "--repeats", 1, "--warmup", 0,
           "--out", "runs/bench")  # each model loaded in a child process
    invoke("report", "runs/rec-model")
    assert (tmp_path / "runs" / "rec-model" / "model" / "config.json").is_file()


# -- 4. one writer per run directory -------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from shearkit.errors import ShearkitError
from shearkit.runs import RunDir
out, go = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    run = RunDir(out, "eval", overwrite=True)
except ShearkitError as e:
    print("refused", e, flush=True)
    sys.exit(0)
run.write_metrics({"writer": run.path.name})
print("writing", flush=True)
time.sleep(float(sys.argv[3]))
run.close()
print("done", flush=True)
"""


def holder(out: Path, go: Path, hold: float = 60) -> subprocess.Popen:
    """A process that opens the run directory `out` once `go` exists and holds it for `hold` s."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(go), str(hold)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_second_process_is_refused_while_the_first_writes_and_not_after_it_is_killed(tmp_path, monkeypatch):
    import shearkit.runs as runs

    out, go = tmp_path / "run", tmp_path / "go"
    go.touch()
    first = holder(out, go)
    try:
        assert first.stdout.readline().strip() == "writing"
        assert (out / LOCK).is_file()
        for kwargs in ({}, {"overwrite": True}, {"reuse": True}):
            with pytest.raises(ShearkitError, match=f"Run directory {out} is being written by another shearkit "
                                                    f"process \\(pid {first.pid}"):
                RunDir(out, "eval", **kwargs)
        # the lock refuses by itself, whatever the marker says (not written yet, another host, ...)
        monkeypatch.setattr(runs, "_writer_alive", lambda marker: False)
        with pytest.raises(ShearkitError, match="is being written by another shearkit process.*choose another --out"):
            RunDir(out, "eval", overwrite=True)
        assert json.loads((out / "metrics.json").read_text()) == {"writer": "run"}  # nothing of it was touched
        assert read_marker(out)["status"] == "running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed: its lock went with it (the lock file stays; nobody holds it)
    assert (out / LOCK).is_file() and read_marker(out)["status"] == "running"
    with RunDir(out, "eval", reuse=True) as run:  # e.g. --resume
        run.write_metrics({"writer": "second"})
    assert not (out / LOCK).exists() and read_marker(out)["status"] == "complete"
    with RunDir(out, "eval", overwrite=True):
        assert (out / LOCK).is_file() and sorted(p.name for p in out.iterdir()) == [MARKER, LOCK, "run.log"]


def test_processes_starting_together_get_one_writer(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    with RunDir(out, "eval") as run:  # a finished run they all ask to --overwrite
        run.write_metrics({"writer": "old"})
    procs = [holder(out, go, hold=3) for _ in range(3)]
    go.touch()  # all at once
    said = [p.communicate(timeout=60)[0] for p in procs]
    writers = [s for s in said if s.startswith("writing")]
    refused = [s for s in said if s.startswith("refused")]
    assert len(writers) == 1 and len(refused) == 2, said
    assert all("being written by another shearkit process" in s for s in refused), said
    assert json.loads((out / "metrics.json").read_text()) == {"writer": "run"}
    assert read_marker(out)["status"] == "running"  # (closed without `with`) and no lock left
    assert not (out / LOCK).exists()


def test_the_command_line_refuses_a_run_directory_another_process_writes(tmp_path):
    from typer.testing import CliRunner

    from shearkit.cli import app

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    out, go = tmp_path / "run", tmp_path / "go"
    go.touch()
    first = holder(out, go)
    try:
        assert first.stdout.readline().strip() == "writing"
        r = CliRunner().invoke(app, ["eval", str(tmp_path / "no-model-needed"), "--tasks", str(text), "--out", str(out),
                                     "--overwrite"])
        assert isinstance(r.exception, ShearkitError), r.output
        assert f"{out} is being written by another shearkit process (pid {first.pid}" in str(r.exception)
        assert json.loads((out / "metrics.json").read_text()) == {"writer": "run"}
    finally:
        first.kill()
        first.wait()


def test_a_refused_run_leaves_no_lock_or_folder_behind(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ShearkitError, match="already exists and is not empty"):
        RunDir(mine, "eval")
    assert os.listdir(mine) == ["notes.txt"]
    with pytest.raises(ShearkitError, match="Cannot create the run directory .*choose another --out"):
        RunDir(mine / "notes.txt" / "run", "eval")
    (tmp_path / "odd" / LOCK).mkdir(parents=True)  # something that cannot be locked where the lock goes
    with pytest.raises(ShearkitError, match="Cannot lock the run directory .*odd: Is a directory"):
        RunDir(tmp_path / "odd", "eval")
    (tmp_path / "odd2" / "run.log").mkdir(parents=True)  # the log cannot be opened
    with pytest.raises(ShearkitError, match="Cannot write the run directory .*odd2: Is a directory"):
        RunDir(tmp_path / "odd2", "eval", reuse=True)
    assert sorted(os.listdir(tmp_path / "odd2")) == [MARKER, "run.log"]  # (the marker says `running`: no lock)
    # a new run directory that cannot be written (full disk): refused, and nothing of it is left
    new = tmp_path / "new" / "run"
    new.parent.mkdir()
    (tmp_path / "probe").mkdir()
    n = len(count_calls(lambda: RunDir(tmp_path / "probe" / "run", "eval").close(), monkeypatch))
    fails_at_each_call(n, lambda: RunDir(new, "eval").close(),
                       lambda msg: (FULL in msg and str(new) in msg and os.listdir(tmp_path / "new") == []) or
                       pytest.fail(msg), monkeypatch)
    with RunDir(tmp_path / "run", "eval") as run:  # a second RunDir of the same folder in one process shares it
        with RunDir(run.path, "eval", reuse=True) as again:
            again.log("same process")
        assert (run.path / LOCK).is_file()  # still held by the first
    assert not (tmp_path / "run" / LOCK).exists()
