"""Read a run directory (what `shearkit eval/prune/run` write) into plain data for a report.

Layout: `recipe.yaml`, `metrics.json`, `plan.json`, `env.json`, `recovery/train_log.jsonl`,
`model/`; every part is optional except that a run must have at least one of recipe, metrics
or plan.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ShearkitError

TRAIN_LOG = Path("recovery") / "train_log.jsonl"


@dataclass
class RunData:
    """The parts of one run directory a report shows."""

    path: Path
    label: str
    recipe_text: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    env: dict[str, Any] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # problems worth telling the reader (skipped lines)

    @property
    def tasks(self) -> dict[str, dict]:
        """Task -> result record of the final model."""
        return self.metrics.get("tasks") or {}

    def find(self, recorded: str | None) -> Path | None:
        """A file the run's metrics name (e.g. `recover.plot`), resolved against the run directory, so a
        moved run directory still finds its files. Runs written before paths were stored relative to the
        run directory name them from the caller's working directory; their tail inside the run directory
        is tried too. None when the file is not there."""
        if not recorded:
            return None
        parts = Path(recorded).parts
        for i in range(len(parts)):
            p = self.path.joinpath(*parts[i:])
            if not Path(parts[i]).is_absolute() and p.exists():
                return p
        return None


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShearkitError(f"{p} is not valid JSON ({e}); re-run the command that wrote it.") from None


def read_train_log(p: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSONL training log (with a `step`), and how many lines were not readable."""
    rows, bad = [], 0
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # e.g. the last line of a run that was killed mid-write
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            rows.append(rec)
        else:
            bad += 1
    return rows, bad


def load_run(path: str | os.PathLike, label: str | None = None) -> RunData:
    """Read a run directory.

    Args:
        path: the run directory.
        label: a name for it in tables (default: the directory name).

    Raises:
        ShearkitError: the path is not a directory, holds none of recipe.yaml / metrics.json /
            plan.json, or one of them is not readable.
    """
    p = Path(path)
    if not p.is_dir():
        raise ShearkitError(f"Run directory {p} does not exist (or is not a directory); pass the folder a "
                            "shearkit command wrote, e.g. runs/prune-20250101-120000.")
    parts = {n: p / n for n in ("recipe.yaml", "metrics.json", "plan.json", "env.json")}
    if not any(parts[n].is_file() for n in ("recipe.yaml", "metrics.json", "plan.json")):
        raise ShearkitError(f"{p} is not a shearkit run directory: it has none of recipe.yaml, metrics.json, "
                            "plan.json.")
    run = RunData(path=p, label=label or p.resolve().name)
    if parts["recipe.yaml"].is_file():
        run.recipe_text = parts["recipe.yaml"].read_text(encoding="utf-8")
    if parts["metrics.json"].is_file():
        m = _read_json(parts["metrics.json"])
        if not isinstance(m, dict):
            raise ShearkitError(f"{parts['metrics.json']} should hold a JSON object.")
        run.metrics = m
    if parts["plan.json"].is_file():
        plan = _read_json(parts["plan.json"])
        if not isinstance(plan, dict) or "kind" not in plan:
            raise ShearkitError(f"{parts['plan.json']} is not a shearkit plan (no 'kind').")
        run.plan = plan
    if parts["env.json"].is_file():
        run.env = _read_json(parts["env.json"])
    log = p / TRAIN_LOG
    if log.is_file():
        run.train_log, bad = read_train_log(log)
        if bad:
            run.notes.append(f"{bad} line(s) of {TRAIN_LOG} were not readable and were skipped.")
    return run
