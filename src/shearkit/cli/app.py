"""The typer app and options shared by commands."""
from __future__ import annotations

from typing import Optional

import typer

from .._version import __version__

app = typer.Typer(
    name="shearkit",
    help="Prune large language models (LoRAPrune, LLM-Pruner, FlexiGPT, ShortGPT, Wanda, SparseGPT, BESA and "
         "magnitude; `shearkit list` names them), recover them with LoRA, and evaluate them.\n\nThe model (first argument) is a built-in name (smollm2-135m), a "
         "local model directory, a .gguf file, or a Hugging Face hub id.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shearkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    """shearkit: prune, recover, evaluate."""


# Options shared across commands (typer needs them as defaults in each signature)
MODEL_ARG = typer.Argument(None, help="Model: built-in name, local dir, .gguf file or hub id.", show_default=False)
MODEL_OPT = typer.Option(None, "--model", "-m", help="The model, as an option (same as the first argument).")
DEVICE_OPT = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
DTYPE_OPT = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
CACHE_OPT = typer.Option(None, "--cache-dir", help="Cache for built-in models (default $SHEARKIT_CACHE).")
DATA_OPT = typer.Option(None, "--data-dir", help="Local data directory (default $SHEARKIT_DATA).")
OUT_OPT = typer.Option(None, "--out", help="Run directory (default runs/<command>-<timestamp>).")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace an existing run directory.")
RECIPE_OPT = typer.Option(None, "--recipe", help="YAML recipe; flags override its values.")
SET_OPT = typer.Option(None, "--set", help="Override a recipe value: section.key=value (repeatable).")
TRUST_OPT = typer.Option(False, "--trust-remote-code", help="Allow model code from the model directory.")
LAZY_OPT = typer.Option(False, "--lazy", help="Keep the decoder blocks on disk and load one at a time (models larger "
                        "than memory: the methods without gradients or training; evaluation and saving).")
MAX_MEMORY_OPT = typer.Option(None, "--max-memory", help="Memory the weights may take, e.g. 8GB: a larger model is "
                              "loaded block by block (--lazy); one that cannot fit even so is refused.")


def check_resume_flags(resume: bool, overwrite: bool, out: Optional[str]) -> None:
    """Refuse `--resume` without the interrupted run's directory, or together with `--overwrite`."""
    from pathlib import Path

    from ..errors import ShearkitError

    if resume and overwrite:
        raise ShearkitError("--resume and --overwrite contradict each other; give one.")
    if resume and not (out and Path(out).is_dir()):
        raise ShearkitError("--resume needs --out pointing at the run directory of the interrupted run.")


def pick_model(model: Optional[str], model_opt: Optional[str], required: bool = True) -> Optional[str]:
    """The model from the positional argument or --model (not both)."""
    from ..errors import ShearkitError

    if model and model_opt and model != model_opt:
        raise ShearkitError(f"Two models given ('{model}' and --model '{model_opt}'); give one.")
    m = model or model_opt
    if required and not m:
        raise ShearkitError("No model given: pass it as the first argument, e.g. `shearkit eval smollm2-135m`.")
    return m


def model_section(m: Optional[str], device: str, dtype: str, cache_dir: Optional[str],
                  trust_remote_code: bool, lazy: bool = False, max_memory: Optional[str] = None) -> dict:
    """The recipe's `model` section from the shared options; "auto" and unset flags stay None so the
    recipe's own values (or the defaults) apply."""
    return {"name": m, "device": device if device != "auto" else None, "dtype": dtype if dtype != "auto" else None,
            "cache_dir": cache_dir, "trust_remote_code": trust_remote_code or None, "lazy": lazy or None,
            "max_memory": max_memory}


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right" if c in ("value", "ratio") else "left")
    for r in rows:
        t.add_row(*[fmt(x) for x in r])
    console = Console()
    if not console.is_terminal:  # piped or redirected: the table's natural width, never cut at 80 columns
        console = Console(width=max(console.measure(t, options=console.options.update_width(10**6)).maximum, 80))
    console.print(t)


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)
