"""Zero-shot multiple-choice tasks through lm-evaluation-harness, offline from the local data dir.

The harness does the scoring (`HFLM` around the in-memory model, so pruned models with per-layer
widths work unchanged; `simple_evaluate` for requests, log-likelihoods, acc and acc_norm). What this
module adds is task resolution:

* `piqa_local`, `boolq_local`, `hellaswag_local`, `winogrande_local`, `arc_easy_local`,
  `arc_challenge_local`, `openbookqa_local` are harness task configs shipped in `shearkit/tasks/`
  whose dataset is a local JSONL file in the data dir (`$SHEARKIT_DATA` or `data_dir`); the
  absolute path is filled in at run time and the configs are written to a temporary folder that a
  `TaskManager` indexes. `docs/zeroshot.md` says how each prompt compares with the harness's own.
* The seven standard names (`piqa`, `boolq`, ...) run their local variant when the data dir has the
  file, else the harness's hub task of that name.
* Any other harness task name, or `hub:NAME` to force the hub version, passes through to the harness.

Each result records the harness version, the task version, the limit, the batch size and the dtype,
because scores move between harness versions and batch sizes.
"""
from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..errors import ShearkitError, did_you_mean

HUB_PREFIX = "hub:"
LOCAL_SUFFIX = "_local"
# the metric a task is ranked by when the harness reports it (papers print acc_norm where it exists)
MAIN_METRICS = ("acc_norm", "acc")


@dataclass(frozen=True)
class LocalTask:
    """A task config shipped with shearkit that reads one file of the data dir."""

    name: str  # e.g. "arc_easy_local"
    standard: str  # the harness's name for the same task, e.g. "arc_easy"
    split: str  # the split name used in data_files
    relpath: str  # the file, relative to the data dir
    config: dict  # the parsed YAML (relative data_files)
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedTask:
    """One requested task name and what it runs."""

    requested: str
    name: str  # the task name the harness runs and results are keyed by
    source: str  # "local" | "hub"
    path: Path | None = None  # the local data file


@functools.lru_cache(maxsize=1)
def local_tasks() -> dict[str, LocalTask]:
    """The task configs shipped in `shearkit/tasks/*.yaml`, by task name."""
    import yaml

    out: dict[str, LocalTask] = {}
    for f in sorted(resources.files("shearkit").joinpath("tasks").iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yaml"):
            continue
        cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
        (split, rel), = cfg["dataset_kwargs"]["data_files"].items()
        name = cfg["task"]
        out[name] = LocalTask(name=name, standard=name[: -len(LOCAL_SUFFIX)], split=split, relpath=rel, config=cfg,
                              metrics=tuple(m["metric"] for m in cfg["metric_list"]))
    return out


def standard_names() -> dict[str, str]:
    """Standard harness name -> local task name (`piqa` -> `piqa_local`)."""
    return {t.standard: t.name for t in local_tasks().values()}


@functools.lru_cache(maxsize=1)
def harness_task_names() -> frozenset[str]:
    """Every task, group and tag name the installed harness knows (indexing takes ~10 s, so it is cached)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:  # no harness: only the names shearkit ships are known
        return frozenset()
    return frozenset(TaskManager().all_tasks)


def _hub_offline() -> bool:
    from ..data.availability import hub_offline

    return hub_offline()


def _data_root(data_dir) -> Path | None:
    from ..data.sources import resolve_data_dir

    return resolve_data_dir(data_dir)


def resolve_tasks(names: Iterable[str] | str, data_dir: str | os.PathLike | None = None) -> list[ResolvedTask]:
    """Map requested names to the tasks that run, checking each early.

    Args:
        names: task names, or one comma-separated string.
        data_dir: the local data directory (default `$SHEARKIT_DATA`).

    Returns:
        One `ResolvedTask` per distinct name, in order.

    Raises:
        ShearkitError: an unknown name (with a suggestion), a `_local` task without its data file,
            or a hub task while the hub is switched off.
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(dict.fromkeys(names))
    if not names:
        raise ShearkitError("No zero-shot task given; choose from " + ", ".join(sorted(standard_names())) + ".")
    local, std = local_tasks(), standard_names()
    root = _data_root(data_dir)
    out: list[ResolvedTask] = []
    for n in names:
        if n.startswith(HUB_PREFIX):
            out.append(_hub_task(n, n[len(HUB_PREFIX):], local, std))
        elif n in local or n in std:
            t = local[n] if n in local else local[std[n]]
            path = root / t.relpath if root is not None else None
            if path is not None and path.is_file():
                out.append(ResolvedTask(n, t.name, "local", path))
            elif n in local:  # asked for the local variant explicitly
                where = (f"{path}, which is not in the data directory" if path is not None else
                         f"<data dir>/{t.relpath}, but no data directory is set ($SHEARKIT_DATA or --data-dir)")
                raise ShearkitError(f"Task '{n}' reads {where}. Point $SHEARKIT_DATA / --data-dir at the data folder, "
                                    f"or use '{t.standard}' for the harness's hub version.")
            else:
                out.append(_hub_task(n, n, local, std))
        else:
            out.append(_hub_task(n, n, local, std))
    seen: dict[str, str] = {}
    for r in out:
        if r.name in seen:
            raise ShearkitError(f"Tasks '{seen[r.name]}' and '{r.requested}' both run '{r.name}'; give it once.")
        seen[r.name] = r.requested
    return out


def _hub_task(requested: str, name: str, local: dict, std: dict) -> ResolvedTask:
    ours = sorted(set(local) | set(std))
    if name not in std and name not in harness_task_names():
        raise ShearkitError(
            f"Unknown zero-shot task '{requested}'.{did_you_mean(name, [*ours, *harness_task_names()])} "
            f"Tasks with local data: {', '.join(ours)}; any lm-evaluation-harness task name also works online.")
    if _hub_offline():
        hint = (f" '{std_local}' runs offline from the data dir." if (std_local := std.get(name)) else
                f" Tasks that run offline from the data dir: {', '.join(sorted(local))}.")
        raise ShearkitError(f"Task '{requested}' needs the Hugging Face hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
                            f"is set (and no local file serves it).{hint}")
    return ResolvedTask(requested, name, "hub")


def check_tasks(names: Iterable[str] | str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Check task names before any model is loaded; returns the names that will run (e.g. `boolq_local`)."""
    return [r.name for r in resolve_tasks(names, data_dir)]


def write_task_configs(tasks: list[ResolvedTask], folder: str | os.PathLike) -> Path:
    """Write the local tasks' configs into `folder` with absolute data paths, for a `TaskManager` to index."""
    import yaml

    folder = Path(folder)
    local = local_tasks()
    for r in tasks:
        if r.source != "local":
            continue
        t = local[r.name]
        cfg = dict(t.config)
        cfg["dataset_kwargs"] = {**cfg.get("dataset_kwargs", {}), "data_files": {t.split: str(r.path)}}
        (folder / f"{t.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True),
                                               encoding="utf-8")
    return folder


def zeroshot(model, tokenizer, names: Iterable[str] | str, limit: int | None = None, batch_size: int | str | None = 1,
             data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of an in-memory model on multiple-choice tasks, scored by lm-evaluation-harness.

    Args:
        model: a causal LM (`transformers.PreTrainedModel`, including shearkit's per-layer-width models),
            on any device; it is evaluated where it is.
        tokenizer: its tokenizer.
        names: task names (see `resolve_tasks`), or one comma-separated string.
        limit: only the first N examples of each task (quick runs; full HellaSwag is 40k requests).
        batch_size: requests per forward pass (None: 1), or `auto`: 1 on the CPU, else lm-eval's automatic
            batch size (the largest from 64 down that fits in memory).
        data_dir: the local data directory (default `$SHEARKIT_DATA`).

    Returns:
        Task name (as run, e.g. `piqa_local`) -> record with `metrics` ({"acc": x, "acc_norm": y}, as the
        harness defines them for that task), `stderr`, `value` and `metric` (acc_norm where the task has it,
        else acc), `harness_version`, `task_version`, `limit`, `num_fewshot`, `batch_size`, `dtype`,
        `n_samples`, `source` and `requested`.
    """
    if limit is not None and limit < 1:
        raise ShearkitError(f"limit must be a positive number of examples, got {limit}.")
    batch_size = 1 if batch_size is None else batch_size
    if batch_size == "auto":  # lm-eval's own: from 64 down until a batch fits (on the CPU: 1, as before)
        batch_size = 1 if next(model.parameters()).device.type == "cpu" else "auto"
    elif batch_size < 1:
        raise ShearkitError(f"batch_size must be at least 1, got {batch_size}.")
    resolved = resolve_tasks(names, data_dir)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ShearkitError(f"Zero-shot tasks need lm-evaluation-harness ({e}); install it with "
                            "`pip install lm_eval`.") from None

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="shearkit-tasks-") as tmp:
        write_task_configs(resolved, tmp)
        need_hub = any(r.source == "hub" for r in resolved)
        tm = TaskManager(include_path=tmp, include_defaults=need_hub)
        out = lm_eval.simple_evaluate(model=lm, tasks=[r.name for r in resolved], num_fewshot=0, limit=limit,
                                      batch_size=batch_size, task_manager=tm, log_samples=False,
                                      bootstrap_iters=1000)  # acc/acc_norm stderr is closed-form
    if out is None:  # non-zero rank under accelerate
        return {}
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    version = getattr(lm_eval, "__version__", None)
    return {r.name: _record(out, r, version, limit, batch_size, dtype) for r in resolved}


def _record(out: dict, r: ResolvedTask, harness_version: str | None, limit: int | None, batch_size: int | str,
            dtype: str) -> dict[str, Any]:
    """One task's record from `simple_evaluate`'s output (keys like `acc,none` -> `acc`)."""
    res = out["results"].get(r.name)
    if res is None:
        raise ShearkitError(f"lm-evaluation-harness returned no result for '{r.name}' (it may be a group; "
                            "name its subtasks instead).")
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for key, v in res.items():
        metric, _, filt = key.partition(",")
        if filt != "none" or not isinstance(v, (int, float)):
            continue
        if metric.endswith("_stderr"):
            stderr[metric[: -len("_stderr")]] = float(v)
        else:
            metrics[metric] = float(v)
    main = next((m for m in MAIN_METRICS if m in metrics), next(iter(metrics), None))
    if main is None:
        raise ShearkitError(f"lm-evaluation-harness reported no numeric metric for '{r.name}'.")
    n = out.get("n-samples", {}).get(r.name, {})
    return {"metrics": metrics, "stderr": stderr, "value": metrics[main], "metric": main,
            "harness_version": harness_version, "task_version": out.get("versions", {}).get(r.name),
            "limit": limit, "num_fewshot": 0, "batch_size": batch_size, "dtype": dtype,
            "n_samples": n.get("effective"), "source": r.source, "requested": r.requested,
            **({"data_file": str(r.path)} if r.path is not None else {})}


__all__ = ["check_tasks", "resolve_tasks", "zeroshot", "local_tasks", "standard_names", "write_task_configs"]
