"""Shared parts of the resumable benchmarks: a JSON-lines results file merged under a file lock, and
one shearkit command run in a child process with a fixed number of torch threads."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

LOCK_TIMEOUT_S = 600


def machine() -> str:
    """The machine a row was measured on, as the docs print it."""
    return f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def today() -> str:
    return time.strftime("%Y-%m-%d")


class Results:
    """A `.jsonl` file of result rows keyed by `key`; every read-merge-write holds its lock, so two
    benchmark processes running different cells never drop each other's rows."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return {r["key"]: r for r in rows}

    def lock(self) -> FileLock:
        """The lock beside the file (a dot-file, git-ignored)."""
        return FileLock(str(self.path.with_name(f".{self.path.name}.lock")), timeout=LOCK_TIMEOUT_S)

    def save(self, row: dict) -> dict[str, dict]:
        """Merge one row (re-reading the file inside the lock) and return all rows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock():
            rows = self.load()
            rows[row["key"]] = merge_attempt(rows.get(row["key"]), row)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps(v) + "\n" for v in rows.values()))
            os.replace(tmp, self.path)
        return rows


def merge_attempt(before: dict | None, row: dict) -> dict:
    """The row to keep for a cell: a failed or timed-out attempt does not erase an earlier finished
    measurement; it is recorded beside it as `last_attempt`."""
    if row.get("status") == "ok" or not before or before.get("status") != "ok":
        return row
    attempt = {k: row[k] for k in ("status", "wall_s", "date", "error", "protocol") if k in row}
    return {**before, "last_attempt": attempt}


def run_shearkit(cmd: list[str], budget_s: int, threads: int = 1) -> dict | None:
    """Run one shearkit CLI command in a child process with `threads` torch threads (more threads than
    free cores make a shared machine crawl); None when it succeeded, else the failure fields."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run([sys.executable, "-m", "shearkit.cli", *cmd], capture_output=True, text=True,
                              timeout=budget_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr.strip()[-600:]}
    return None
