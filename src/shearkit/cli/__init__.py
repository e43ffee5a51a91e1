"""The `shearkit` command line: a thin layer over the Python API.

Every command takes the model as its first positional argument (`--model` works too). Heavy
libraries are imported inside the commands, so `shearkit --help` starts fast.
"""
from __future__ import annotations

import sys

from . import core, prune_cmds, recover_cmds, report_cmds  # noqa: F401  (each registers its commands on `app`)
from .app import app


def main() -> None:
    """Entry point: run the app, turning user errors into one clear line and exit code 2."""
    from ..errors import ShearkitError

    try:
        app(standalone_mode=False)
    except ShearkitError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


__all__ = ["app", "main"]
