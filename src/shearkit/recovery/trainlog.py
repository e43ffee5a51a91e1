"""The training log (`train_log.jsonl`, one JSON record per logged step) and its loss-curve plot."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_file, write_text


class TrainLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        self._rewrite()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


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
