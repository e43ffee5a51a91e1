"""Run directories: every command that produces something writes one.

A run directory holds the resolved recipe (`recipe.yaml`), `metrics.json`, a log (`run.log`)
and the environment (`env.json`: versions, device, seed). An existing, non-empty directory is
never reused unless the user passes `--overwrite`.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ShearkitError
from .io.atomic import write_json, write_text


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


class RunDir:
    """A run directory being written."""

    def __init__(self, path: str | os.PathLike | None, command: str, overwrite: bool = False,
                 reuse: bool = False):
        # reuse=True continues in an existing run directory (e.g. `recover --resume`), keeping its files
        self.path = Path(path) if path else default_run_dir(command)
        if self.path.exists() and any(self.path.iterdir()) and not reuse:
            if not overwrite:
                raise ShearkitError(f"Run directory {self.path} already exists and is not empty; "
                                    "choose another --out or pass --overwrite.")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.logger = logging.getLogger("shearkit")
        self._handler = logging.FileHandler(self.path / "run.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger.addHandler(self._handler)
        self.logger.setLevel(logging.INFO)

    def log(self, msg: str) -> None:
        self.logger.info(msg)

    def write_recipe(self, recipe) -> None:
        write_text(self.path / "recipe.yaml", recipe.to_yaml())

    def write_env(self, device: str | None = None, seed: int | dict[str, int] | None = None) -> None:
        write_json(self.path / "env.json", environment(device, seed))

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path / "metrics.json", metrics)

    def read_metrics(self) -> dict:
        p = self.path / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def close(self) -> None:
        self.logger.removeHandler(self._handler)
        self._handler.close()
