"""Reports: a run directory rendered as markdown and one self-contained HTML page, with plots.

`write_report(run_dir, vs=[...])` reads the run (recipe, metrics, plan, training log, environment),
compares its final model with the dense model and the pruned model before recovery measured in the
same run, and with other runs, and writes
`report.md`, `figures/*.png` and `report.html` (figures inlined as base64 PNG) into
`<run_dir>/report/` or `out`.

Methods can add plots without touching this package: any entry of `plan.extra` that is a list of
numbers (per layer or per step), a dict of such lists (several series), or a dict of number by
layer index is drawn under "Method records" (e.g. `extra["layer_importance"] = [...]`,
`extra["knowledge_distribution"] = {"attn": [...], "mlp": [...]}`). A series whose values are all
equal becomes one sentence; the structured planner's own records (dense layers, layer sizes) are
drawn in the plan figure instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import ShearkitError
from .build import build_document
from .render import Document, to_html, to_markdown
from .rundir import RunData, load_run

REPORT_FILES = ("report.md", "report.html")


def write_report(run_dir: str | os.PathLike, vs: Iterable[str | os.PathLike] = (), out: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
    """Write the report of `run_dir` and return its folder.

    Args:
        run_dir: the run directory to report on.
        vs: other run directories to compare with (their final metrics become extra columns).
        out: the report folder (default `<run_dir>/report`).
        overwrite: replace a previous report in `out` (a folder holding anything else is never replaced).

    Raises:
        ShearkitError: a run directory is missing or unreadable, `out` holds a report and `overwrite`
            is off, or `out` holds other files.
    """
    from ..io.atomic import atomic_dir
    from ..io.guard import refuse_unsafe_removal

    run = load_run(run_dir)
    others = [load_run(v) for v in vs]
    target = Path(out) if out is not None else run.path / "report"
    if target.exists():
        if not target.is_dir():
            raise ShearkitError(f"{target} exists and is not a directory; choose another --out.")
        previous = any((target / f).is_file() for f in REPORT_FILES)
        foreign = sorted(p.name for p in target.iterdir() if p.name not in (*REPORT_FILES, "figures"))
        if foreign or (any(target.iterdir()) and not previous):
            raise ShearkitError(f"{target} already holds files that are not a shearkit report "
                                f"({', '.join(foreign[:3]) or 'figures/ without a report'}); choose another --out "
                                "(shearkit replaces only a folder holding a previous report and nothing else).")
        if previous and not overwrite:
            raise ShearkitError(f"{target} already holds a report; pass --overwrite to replace it, or choose "
                                "another --out.")
        refuse_unsafe_removal(target, [run.path, *(o.path for o in others)])
    doc = build_document(run, others)
    with atomic_dir(target, overwrite=True) as tmp:
        figs = tmp / "figures"
        figs.mkdir()
        for f in doc.figures():
            (figs / f"{f.name}.png").write_bytes(f.png)
        (tmp / "report.md").write_text(to_markdown(doc), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(doc), encoding="utf-8")
    return target


__all__ = ["write_report", "load_run", "build_document", "RunData", "Document", "to_html", "to_markdown"]
