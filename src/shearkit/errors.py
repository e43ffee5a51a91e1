"""User-facing errors: each says what went wrong and what to change.

`docs/errors.md` lists every place that raises one, generated from this code by `tools/errors_doc.py`.
With `SHEARKIT_RECORD_ERRORS=FILE` set, each `ShearkitError` appends where it was raised (and the test
running, under pytest) to FILE as one JSON line: that is how the test suite shows which test makes
each error happen (see tests/conftest.py).
"""
from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Iterable

RECORD_ENV = "SHEARKIT_RECORD_ERRORS"
_PACKAGE = str(Path(__file__).resolve().parent)


class ShearkitError(ValueError):
    """A problem with the user's input or environment, reported without a deep traceback."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        record = os.environ.get(RECORD_ENV)
        if record:
            _record_site(record)


def _record_site(path: str) -> None:
    """Append the shearkit frames that built this error (innermost first) and the running test to `path`."""
    frames, f = [], sys._getframe(2)
    while f is not None and len(frames) < 4:
        name = f.f_code.co_filename
        if name.startswith(_PACKAGE):
            frames.append([os.path.relpath(name, _PACKAGE), f.f_lineno])
        f = f.f_back
    line = json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0], "frames": frames})
    try:  # one write of one line with O_APPEND: lines of several processes do not interleave
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest valid choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> ShearkitError:
    """Build the standard error for an unknown name, with a suggestion and the valid names."""
    choices = sorted(choices)
    return ShearkitError(
        f"Unknown {kind} '{name}'.{did_you_mean(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )


def out_of_memory(exc: BaseException) -> ShearkitError | None:
    """The user-facing error for running out of memory (what `batching.is_oom` counts as such, or a
    host `MemoryError`), saying which knobs make a batch smaller; None for any other exception."""
    torch = sys.modules.get("torch")
    if not isinstance(exc, MemoryError):
        from .batching import is_oom

        if torch is None or not is_oom(exc):
            return None
    cuda = torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ()))
    where = "on the GPU" if cuda else "in host memory" if isinstance(exc, MemoryError) else "on the device"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return ShearkitError(f"Out of memory {where}{f' ({first})' if first else ''}. Make each batch smaller: "
                         "lower train.batch_size (--batch-size) and raise train.grad_accum to keep the same "
                         "effective batch, lower eval.batch_size or the sequence length (--seqlen, calib.seqlen), "
                         "or use fewer calibration samples (calib.samples); or run on a device with more "
                         "memory (--device).")
