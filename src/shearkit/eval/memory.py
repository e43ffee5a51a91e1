"""Peak memory of a piece of work, in this process or in a child process of its own.

Three figures: RSS (resident pages, file-backed ones such as memory-mapped safetensors included),
anonymous RSS (what the process allocated itself; file-backed pages do not count) and, where CUDA is
in use, torch's allocated bytes. Work run in a child process (`ChildWorker`, `measure_in_child`) has
figures of its own: nothing else the caller holds counts, so two models measured this way have two
peaks. Memory comparisons (bench, importance estimation, calibration) should all go through here.
"""
from __future__ import annotations

import functools
import importlib
import os
import pickle  # only over the private pipe to our own child process: never a file or foreign input
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ShearkitError

_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory of this process at one moment (or the peaks over a span), in bytes.

    `anon_rss` is None where /proc is not readable; `cuda_allocated` is None when CUDA is not in use.
    """

    rss: int
    anon_rss: int | None = None
    cuda_allocated: int | None = None


def _status_kib(*keys: str) -> dict[str, int]:
    """The named `kB` fields of /proc/self/status (empty where there is no /proc)."""
    try:
        lines = _STATUS.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        k, _, v = line.partition(":")
        if k in keys:
            out[k] = int(v.split()[0]) * 1024
    return out


def _cuda_in_use() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def snapshot() -> MemorySnapshot:
    """This process's memory now."""
    st = _status_kib("VmRSS", "RssAnon")
    if "VmRSS" in st:
        rss = st["VmRSS"]
    else:
        import psutil

        rss = psutil.Process().memory_info().rss
    cuda = None
    if _cuda_in_use():
        import torch

        cuda = torch.cuda.memory_allocated()
    return MemorySnapshot(rss, st.get("RssAnon"), cuda)


def _reset_rss_high_water() -> bool:
    """Restart the kernel's RSS high-water mark (VmHWM) from the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory during a block of this process: the kernel's RSS high-water mark (restarted on entry)
    and the RSS and anonymous RSS sampled every `interval` seconds by a background thread; with CUDA,
    torch's max allocated.

    After the block: `start` and `peak_snapshot` (MemorySnapshot) and `peak`, the single figure callers
    report: CUDA max allocated on a CUDA device, else the peak RSS.
    """

    def __init__(self, device: Any = None, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.start: MemorySnapshot | None = None
        self.peak_snapshot: MemorySnapshot | None = None
        self.peak = 0
        self._stop = threading.Event()

    def _cuda(self) -> bool:
        return getattr(self.device, "type", str(self.device or "")).startswith("cuda") or _cuda_in_use()

    def __enter__(self) -> "PeakMemory":
        if self._cuda():
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = snapshot()
        self._hwm = _reset_rss_high_water()
        self._rss, self._anon = self.start.rss, self.start.anon_rss

        def poll() -> None:
            while not self._stop.is_set():
                s = snapshot()
                self._rss = max(self._rss, s.rss)
                if s.anon_rss is not None:
                    self._anon = max(self._anon or 0, s.anon_rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        cuda = None
        if self._cuda():
            import torch

            torch.cuda.synchronize()
            cuda = torch.cuda.max_memory_allocated()
        self._stop.set()
        self._thread.join()
        end = snapshot()
        rss = max(self._rss, end.rss, _status_kib("VmHWM").get("VmHWM", 0) if self._hwm else 0)
        anon = None if end.anon_rss is None else max(self._anon or 0, end.anon_rss)
        self.peak_snapshot = MemorySnapshot(rss, anon, cuda)
        is_cuda = getattr(self.device, "type", str(self.device or "")).startswith("cuda")
        self.peak = cuda if is_cuda and cuda is not None else rss
        return False


@dataclass(frozen=True)
class Measured:
    """The result of a piece of work run in a child process, and that child's memory: at its start
    (interpreter and `imports` only), after `setup` (e.g. the model loaded), and the peaks during the work."""

    result: Any
    start: MemorySnapshot
    loaded: MemorySnapshot
    peak: MemorySnapshot

    def peak_above(self, base: str = "start") -> int:
        """Peak RSS (CUDA: max allocated) minus that at `base` ('start' or 'loaded')."""
        ref = getattr(self, base)
        if self.peak.cuda_allocated is not None:
            return self.peak.cuda_allocated - (ref.cuda_allocated or 0)
        return self.peak.rss - ref.rss

    def anon_peak_above(self, base: str = "start") -> int | None:
        """Peak anonymous RSS minus that at `base` (None where it cannot be read)."""
        ref = getattr(self, base)
        if self.peak.anon_rss is None or ref.anon_rss is None:
            return None
        return self.peak.anon_rss - ref.anon_rss


def _rebuild_shearkit_class(base_name: str) -> type:
    from ..io.remote_code import make_class

    return make_class(base_name)


class _ByValuePickler(pickle.Pickler):
    """Pickles tensors by value (not through shared memory) and shearkit's per-layer-width model
    classes, which `make_class` builds at run time, by the name of the class they extend."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type) and obj.__module__.endswith("io.remote_code") and "<locals>" in obj.__qualname__:
            return _rebuild_shearkit_class, (obj.__bases__[0].__name__,)
        return NotImplemented


_PICKLE_ERRORS = (pickle.PicklingError, AttributeError, TypeError)


def _pickles(obj: Any) -> bool:
    import io

    try:
        _ByValuePickler(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except _PICKLE_ERRORS:
        return False
    return True


def _unpicklable(obj: Any) -> Any:
    """The innermost part of a message (tuples, lists and dict values opened) that cannot be pickled,
    e.g. the model among a call's arguments, so that the error names it rather than the message."""
    parts = obj if isinstance(obj, (tuple, list)) else obj.values() if isinstance(obj, dict) else ()
    for part in parts:
        if not _pickles(part):
            return _unpicklable(part)
    return obj


def _dumps(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    try:
        _ByValuePickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except _PICKLE_ERRORS as e:
        part = _unpicklable(obj)
        raise ShearkitError(f"Cannot send {type(part).__name__} to a child process for measuring ({e}). "
                            "Pass the model by its name or directory instead of as an object.") from None
    return buf.getvalue()


def _error_payload(e: BaseException) -> tuple[str, Any]:
    tb = traceback.format_exc()
    try:
        pickle.dumps(e)
        return ("error", (e, tb))
    except Exception:  # an exception that cannot travel: send its text
        return ("error", (RuntimeError(f"{type(e).__name__}: {e}"), tb))


def _child_main(read_fd: int, write_fd: int) -> None:
    """Entry point of a child process started by `ChildWorker` (its channel is the two pipe ends)."""
    from multiprocessing.connection import Connection

    try:
        _serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))
    except (EOFError, BrokenPipeError):  # the parent went away
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to save; skip the interpreter's (slow) teardown


def _serve(inbox, outbox) -> None:
    """The child's loop: build the state with `setup`, then run calls on it until told to stop."""
    try:
        imports, threads = pickle.loads(inbox.recv_bytes())
        for name in imports:
            importlib.import_module(name)
        if threads:
            import torch

            torch.set_num_threads(threads)
        start = snapshot()  # before the setup's arguments (which may hold a model) arrive
        setup, args, kwargs = pickle.loads(inbox.recv_bytes())
        state = setup(*args, **kwargs) if setup is not None else None
    except (EOFError, BrokenPipeError):
        raise
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.send_bytes(pickle.dumps(_error_payload(e)))
        return
    del args, kwargs
    outbox.send_bytes(pickle.dumps(("ok", (start, snapshot()))))
    while True:
        msg = pickle.loads(inbox.recv_bytes())
        if msg is None:
            return
        fn, args, kwargs, measure, device = msg
        head = () if setup is None else (state,)
        call = functools.partial(fn, *head, *args, **kwargs)
        try:
            if measure:
                with PeakMemory(device) as pm:
                    result = call()
                reply = ("ok", (result, pm.start, pm.peak_snapshot))
            else:
                reply = ("ok", call())
            outbox.send_bytes(_dumps(reply))
        except BaseException as e:  # noqa: BLE001
            outbox.send_bytes(pickle.dumps(_error_payload(e)))


class ChildWorker:
    """A state (typically a loaded model) held by a child process that runs calls on it one at a time, so
    that its memory is its own and several such states can take turns on the CPU.

    `setup(*args, **kwargs)` builds the state in the child; `call(fn, ...)` runs `fn(state, ...)` there
    and returns its (picklable) result. Functions travel by reference (module-level ones), arguments and
    results by value. The child is a fresh interpreter with the caller's `sys.path` (not a fork, and not
    a multiprocessing spawn, which would re-run the caller's main script). Use as a context manager.
    """

    def __init__(self, setup: Callable[..., Any] | None, *args: Any, imports: tuple[str, ...] = ("torch",),
                 threads: int | None = None, name: str = "work", wait: bool = True, **kwargs: Any):
        from multiprocessing.connection import Connection

        self.name = name
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        code = f"from shearkit.eval.memory import _child_main; _child_main({child_in}, {child_out})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(child_in, child_out), env=env)
        os.close(child_in)
        os.close(child_out)
        self._to = Connection(to_child, readable=False)
        self._from = Connection(from_child, writable=False)
        self._ready = False
        try:
            self._send((tuple(imports), threads))
            self._send((setup, args, kwargs))
            if wait:
                self.ready()
        except BaseException:
            self.close()
            raise

    def ready(self) -> "ChildWorker":
        """Wait until the child has built its state (`wait=False` lets several children start at once);
        then `start` and `loaded` hold its memory before and after `setup`."""
        if not self._ready:
            self.start, self.loaded = self._reply()
            self._ready = True
        return self

    def _send(self, msg: Any) -> None:
        try:
            self._to.send_bytes(_dumps(msg))
        except (BrokenPipeError, ConnectionError):
            self._reply()  # raises the child's error, or says how it exited

    def _reply(self) -> Any:
        try:
            status, payload = pickle.loads(self._from.recv_bytes())
        except (EOFError, ConnectionError):
            try:
                code = self._proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            hint = " (killed: out of memory?)" if code == -9 else ""
            raise ShearkitError(f"The child process measuring {self.name} exited with code {code}{hint}.") from None
        if status == "error":
            exc, tb = payload
            if not isinstance(exc, ShearkitError):
                exc.add_note(f"in the child process measuring {self.name}:\n{tb}")
            raise exc
        return payload

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(state, *args, **kwargs)` run in the child; its result."""
        self.ready()
        self._send((fn, args, kwargs, False, None))
        return self._reply()

    def measure(self, fn: Callable[..., Any], *args: Any, device: Any = None, **kwargs: Any) -> Measured:
        """`fn(state, *args, **kwargs)` run in the child under `PeakMemory`: its result and the child's memory."""
        self.ready()
        self._send((fn, args, kwargs, True, device))
        result, _, peak = self._reply()
        return Measured(result, self.start, self.loaded, peak)

    def close(self) -> None:
        """Stop the child (asking first, then terminating it if it does not exit)."""
        if self._proc.poll() is None:
            try:
                self._to.send_bytes(pickle.dumps(None))
            except (OSError, ValueError):
                pass
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                self._proc.wait(10)
        self._to.close()
        self._from.close()

    def __enter__(self) -> "ChildWorker":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def load_model(name: str, device: str = "cpu", dtype: str = "auto", cache_dir: str | None = None):
    """Setup of a child given a model name or directory: the loaded model (its tokenizer is not needed)."""
    from ..models import load

    return load(name, device=device, dtype=dtype, cache_dir=cache_dir)[0]


def measure_in_child(work: Callable[..., Any], *args: Any, setup: Callable[[], Any] | None = None,
                     device: Any = None, imports: tuple[str, ...] = ("torch",), **kwargs: Any) -> Measured:
    """Run `work(*args, **kwargs)` (or `work(setup(), *args, **kwargs)`) in a fresh child process and return
    its result with the child's memory; `Measured.peak_above('loaded')` is the work's own peak."""
    with ChildWorker(setup, imports=imports, name=getattr(work, "__name__", "work")) as w:
        return w.measure(work, *args, device=device, **kwargs)
