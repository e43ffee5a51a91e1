"""The training log (`train_log.jsonl`, one JSON record per logged step) and its loss-curve plot."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.atomic import atomic_file, os_error_of, write_error, write_text


class TrainLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped first.

    Each record is appended whole or not at all: a failed append (disk full) cuts the file back to
    the records before it and raises `WriteFailed`; a line left torn by a kill is skipped on resume."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a run killed mid-write
                        continue
                    if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        self._rewrite()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(self.path, e, kept=self.path.exists()) from e
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except BaseException as e:
            try:
                os.ftruncate(fd, size)  # no torn line: the log ends with the previous record
            except OSError:
                pass
            err = os_error_of(e)
            if err is None:
                raise
            raise write_error(self.path, err, kept=True) from e
        finally:
            os.close(fd)
        self.records.append(record)


def plot_losses(records: list[dict], path: Path, title: str = "LoRA recovery") -> Path | None:
    """Loss (and eval perplexity, when logged) against step, written as a PNG: the report's figure
    (`shearkit.report.plots.losses`), so both show the same curve."""
    from ..report.plots import losses

    png = losses(records, title)
    if png is None:
        return None
    path = Path(path)
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(png)
    return path
