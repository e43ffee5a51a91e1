"""What the package says about itself (description, --help, package data, plan kinds) is true."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from shearkit.errors import ShearkitError
from shearkit.methods import METHODS
from shearkit.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def advertised_methods(text: str) -> list[str]:
    """The method names listed in the first parentheses of a one-line summary, as registry names."""
    m = re.search(r"\(([^);]*)", text)
    assert m, f"no method list in: {text!r}"
    return [name.strip().lower().replace(" ", "-") for name in m.group(1).replace(" and ", ",").split(",") if name.strip()]


@pytest.mark.parametrize("where", ["description", "help"])
def test_advertised_methods_are_registered(where):
    from shearkit.cli.app import app

    text = PYPROJECT["project"]["description"] if where == "description" else app.info.help
    names = advertised_methods(text)
    assert names and all(n in METHODS for n in names), f"{where} names unregistered methods: {names}"


def test_package_data_patterns_match_files():
    src = ROOT / "src" / "shearkit"
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["shearkit"]
    empty = [p for p in patterns if not list(src.glob(p))]
    assert not empty, f"package-data names files that do not exist: {empty}"


def test_cli_registers_every_command_module():
    from typer.main import get_command

    from shearkit.cli import app

    names = set(get_command(app).commands)
    assert {"prune", "run", "recover", "report", "eval", "bench", "list"} <= names


def test_unknown_plan_kind_is_a_clear_error(tiny_llama):
    from shearkit import apply_plan

    plan = Plan(method="x", kind="sideways", ratio_target=0.1, blocks=[1])
    with pytest.raises(ShearkitError, match="'sideways' is not one shearkit can apply.*'blocks'"):
        apply_plan(tiny_llama, plan, check=False)
