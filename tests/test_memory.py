"""The memory helper: work in a child process has peaks of its own; anonymous RSS leaves out file-backed pages."""
import mmap
import time

import pytest

from shearkit.errors import ShearkitError
from shearkit.eval.memory import ChildWorker, PeakMemory, measure_in_child

MIB = 2**20


def allocate(n_mib: int) -> int:
    """Hold `n_mib` MiB of fresh, touched anonymous memory for a moment (a private mapping, so never pages
    the allocator already holds; long enough for the anonymous-RSS sampler to see it); return its size."""
    with mmap.mmap(-1, n_mib * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as buf:
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        time.sleep(0.05)
        return len(buf)


def read_mapped(path: str) -> int:
    """Touch every page of a memory-mapped file (file-backed pages); return its size."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return sum(m[i] for i in range(0, len(m), 4096)) * 0 + len(m)


def make_buffer(n_mib: int) -> bytearray:
    return bytearray(n_mib * MIB)


def buffer_size(state: bytearray) -> int:
    return len(state)


def fail(_state) -> None:
    raise ShearkitError("told to fail")


def test_child_peak_counts_the_work_alone():
    m = measure_in_child(allocate, 96, imports=())
    assert m.result == 96 * MIB
    assert 90 * MIB < m.peak_above("loaded") < 160 * MIB
    assert 90 * MIB < m.anon_peak_above("loaded") < 160 * MIB


def test_file_backed_pages_count_in_rss_but_not_in_anonymous_rss(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\1" * (64 * MIB))
    m = measure_in_child(read_mapped, str(f), imports=())
    assert m.peak_above("loaded") > 56 * MIB
    assert m.anon_peak_above("loaded") < 16 * MIB


def test_worker_keeps_its_state_and_reports_errors():
    with ChildWorker(make_buffer, 48, imports=(), name="buffer") as w:
        assert w.loaded.rss - w.start.rss > 40 * MIB  # the state is built after the start figure
        assert w.call(buffer_size) == 48 * MIB
        with pytest.raises(ShearkitError, match="told to fail"):
            w.call(fail)
        assert w.measure(buffer_size).result == 48 * MIB  # still serving after an error


def test_peak_memory_in_process():
    with PeakMemory() as pm:
        allocate(64)
    assert pm.peak_snapshot.rss - pm.start.rss > 56 * MIB and pm.peak == pm.peak_snapshot.rss


def test_a_child_that_cannot_start_raises_its_error():
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        ChildWorker(None, imports=("no_such_module_here",))
