"""Command: report."""
from __future__ import annotations

from typing import List, Optional

import typer

from .app import app


@app.command("report")
def report_cmd(
    run_dir: str = typer.Argument(..., help="The run directory to report on."),
    vs: Optional[List[str]] = typer.Option(None, "--vs", help="Another run directory to compare with (repeatable)."),
    out: Optional[str] = typer.Option(None, "--out", help="Report folder (default RUN_DIR/report)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous report in the report folder."),
) -> None:
    """Write a markdown report and a self-contained HTML page with plots for a run directory.

    Example: shearkit report runs/lp20 --vs runs/ls20
    """
    from ..report import write_report

    path = write_report(run_dir, vs or [], out=out, overwrite=overwrite)
    typer.echo(f"report: {path / 'report.html'}")
    typer.echo(f"        {path / 'report.md'}")
