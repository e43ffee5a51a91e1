"""The `shearkit` command line: a thin layer over the Python API.

Every command takes the model as its first positional argument (`--model` works too). Heavy
libraries are imported inside the commands, so `shearkit --help` starts fast.
"""
from __future__ import annotations

import sys

from . import analysis_cmds, core, export_cmds, extend_cmds, prune_cmds, recover_cmds, report_cmds  # noqa: F401  (each registers its commands on `app`)
from .app import app


def main() -> None:
    """Entry point: run the app; user errors become one clear line and exit code 2.

    Typer runs in standalone mode so that its own (vendored) click handles usage errors (unknown
    option or command, missing argument, a value of the wrong type): it prints the usage line and
    the error and exits 2. Only shearkit's own errors reach the handler below, and running out of memory
    (on a GPU or in host memory), which becomes one of them.
    """
    from ..errors import ShearkitError, out_of_memory

    try:
        try:
            app(standalone_mode=True)
        except (RuntimeError, MemoryError) as e:  # out of memory: a clear error that says what to lower
            oom = out_of_memory(e)
            if oom is None:
                raise
            raise oom from None
    except ShearkitError as e:
        from rich.console import Console
        from rich.markup import escape

        # soft_wrap: one line however narrow the terminal, so the message can be copied or grepped whole
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)


__all__ = ["app", "main"]
