"""`shearkit export`: a saved model as a file another engine runs (GGUF for llama.cpp)."""
from __future__ import annotations

import warnings

import typer

from ..errors import ShearkitError
from .app import app

FORMATS = ("gguf",)


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help="A model directory (e.g. RUN_DIR/model) or a built-in name."),
    fmt: str = typer.Option("gguf", "--format", help="Output format: gguf (llama.cpp)."),
    out: str = typer.Option(..., "--out", help="The file to write, e.g. model.gguf."),
    outtype: str = typer.Option("f16", "--outtype", help="f32 | f16 | q8_0 (q8_0 keeps rows not a multiple "
                                                         "of 32 in f16, and says so)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Export a Llama-family model for llama.cpp: uniform widths as llama/qwen2, per-layer widths as deci.

    Example: shearkit export runs/prune-llm/model --format gguf --out pruned.gguf --outtype q8_0
    """
    from .. import api

    if fmt not in FORMATS:
        raise ShearkitError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'. For Hugging Face or "
                            "compressed-tensors folders use `shearkit prune/run --save-format`.")
    with warnings.catch_warnings():  # the q8_0 fallback warning: said below as a note instead
        warnings.simplefilter("ignore", UserWarning)
        r = api.export_gguf(model, out, outtype=outtype, overwrite=overwrite)
    typer.echo(f"wrote {r['path']}: {r['architecture']}, {r['layers']} layers, {r['tensors']} tensors, {outtype}")
    if r["f16_fallback"]:
        typer.echo(f"note: {len(r['f16_fallback'])} tensor(s) kept in f16 (rows not a multiple of 32 for q8_0): "
                   f"{', '.join(r['f16_fallback'])}")
    for note in r["notes"]:
        typer.echo(f"note: {note}")
