"""Batch sizes that fit in memory: run a batch, and when it runs out of memory, run it again in halves.

Every place that runs a model over many sequences (perplexity, the blockwise calibration runner,
the statistics passes, the training step) keeps a `Backoff`: the number of rows (windows,
sequences) one call may take. It starts at the batch size asked for (`resolve_batch_size` picks a
start for `auto`) and halves when a call runs out of memory, down to one row; at one row the
out-of-memory error is raised as it came (the command line turns it into its clear message). The
size it settles on is kept for the calls that follow, so a run backs off once, not once per batch.

Two ways to use it, depending on whether a failed call leaves anything behind:
- `map(fn, n)`: `fn(lo, hi)` is a pure function of rows `lo..hi` (a window's loss, a block's
  output): the failed chunk alone is run again in halves; the results are those of the same rows in
  smaller calls (each row's result is its own, so only float order within batched matrix products
  can differ, and nothing when no call fails);
- `retry(attempt)`: `attempt(rows)` accumulates (gradients, statistics): an out-of-memory error
  part-way leaves partial sums that cannot be taken back, so the whole attempt runs again from its
  start with half the rows per call (the attempt resets what it accumulates). Windows all have the
  same length, so it is the first batch that runs out of memory and little is redone.

Only out-of-memory errors are caught (`is_oom`); any other error propagates unchanged.
Accelerate's `find_executable_batch_size` restarts a whole function with 0.9x the batch and ends in
a generic RuntimeError at zero (the out-of-memory error is lost), so it fits neither use.
"""
from __future__ import annotations

import gc
import logging
from typing import Callable, TypeVar

log = logging.getLogger("shearkit.batching")
T = TypeVar("T")

AUTO = "auto"
AUTO_START = 64  # where `auto` starts on an accelerator (at most the number of rows there are)


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is running out of memory: torch's `OutOfMemoryError` (CUDA), or a RuntimeError
    worded as accelerate's `should_reduce_batch_size` knows it (MPS, XPU, the CPU allocator, and cuDNN's
    "not supported", which a smaller batch also avoids)."""
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    from accelerate.utils.memory import should_reduce_batch_size

    return should_reduce_batch_size(exc)


def free_memory() -> None:
    """Give the memory of a failed call back to the device (after the exception is gone)."""
    from accelerate.utils.memory import clear_device_cache

    gc.collect()
    clear_device_cache()


def resolve_batch_size(batch_size: int | str, rows: int, device) -> int:
    """An integer batch size as given; `auto`: 1 on the CPU (as before: a host seldom reports running
    out of memory before it swaps, and more rows per call buy little there), else `AUTO_START` rows
    (at most `rows`), from which `Backoff` halves until a batch fits."""
    if batch_size != AUTO:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer or '{AUTO}', got {batch_size!r}")
        return batch_size
    import torch

    if torch.device(device).type in ("cpu", "meta"):
        return 1
    return max(1, min(rows, AUTO_START))


class Backoff:
    """Rows per call for `what` (a label for the log), halved on running out of memory.

    `size`: the rows the next call may take; `requested`: what was asked for (an integer or
    `auto`); `backed_off`: whether it ever halved."""

    def __init__(self, size: int, what: str, requested: int | str | None = None):
        self.size = max(1, int(size))
        self.what = what
        self.requested = size if requested is None else requested
        self.backed_off = False
        self._told = False

    @property
    def auto(self) -> bool:
        return self.requested == AUTO

    def _halve(self, rows: int) -> None:
        new = max(1, (rows + 1) // 2)
        # `auto` is expected to try sizes that do not fit: that is news only in the run log
        level = logging.INFO if self.auto else logging.WARNING
        log.log(level, "%s: out of memory with %d sequences per forward pass; running it again with %d (%s)",
                self.what, rows, new, "looking for the auto batch size" if self.auto else
                "the results are the same up to float order; a smaller batch size from the start skips this")
        self.size = min(self.size, new)
        self.backed_off = True
        free_memory()

    def _settled(self) -> None:
        if self.auto and not self._told:
            self._told = True
            log.info("%s: batch size auto chose %d", self.what, self.size)

    def map(self, fn: Callable[[int, int], T], n: int, on_done: Callable[[int], None] | None = None) -> list[T]:
        """`fn(lo, hi)` over rows 0..n in order, at most `size` rows a call; a call that runs out of
        memory is run again on half its rows (`size` stays halved). Returns the calls' results in
        row order (one result when the first call took every row). `on_done(rows)` after each call."""
        out: list[T] = []
        lo = 0
        while lo < n:
            hi = min(lo + self.size, n)
            try:
                out.append(fn(lo, hi))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; everything else re-raised
                if hi - lo <= 1 or not is_oom(e):
                    raise
            else:
                self._settled()
                if on_done is not None:
                    on_done(hi - lo)
                lo = hi
                continue
            self._halve(hi - lo)  # outside the except block: the failed call's tensors are freed
        return out

    def retry(self, attempt: Callable[[int], T], undo: Callable[[], None] | None = None) -> T:
        """`attempt(rows)` with `rows = size`; when it runs out of memory (and `rows` > 1), `undo()`
        (drop what the failed attempt left, e.g. gradients), halve and run the whole attempt again."""
        while True:
            rows = self.size
            try:
                result = attempt(rows)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; everything else re-raised
                if rows <= 1 or not is_oom(e):
                    raise
            else:
                self._settled()
                return result
            if undo is not None:
                undo()
            self._halve(rows)


def chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """(lo, hi) row ranges of at most `rows` covering 0..n."""
    return [(lo, min(lo + rows, n)) for lo in range(0, n, max(1, rows))]
