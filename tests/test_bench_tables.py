"""docs/benchmarks.md's tables are generated from the committed results files, never typed in."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_doc_tables_equal_what_the_results_files_give(tables):
    doc = DOC.read_text()
    assert tables.REGION.search(doc), "docs/benchmarks.md has no generated table regions"
    assert tables.render_doc(doc) == doc, "docs/benchmarks.md differs from bench/results: run python bench/tables.py"


def test_every_table_line_is_inside_a_generated_region(tables):
    doc = DOC.read_text()
    generated = [(m.start(), m.end()) for m in tables.REGION.finditer(doc)]
    grid = re.search(r"<!-- grid:start -->.*?<!-- grid:end -->", doc, re.S)
    generated.append((grid.start(), grid.end()))
    typed = []
    for m in re.finditer(r"^\|.*$", doc, re.M):
        if not any(a <= m.start() < b for a, b in generated):
            typed.append(m.group(0))
    assert not typed, f"table lines outside generated regions (typed in?): {typed[:3]}"


def test_a_figure_typed_into_a_region_is_overwritten(tables):
    doc = DOC.read_text()
    m = next(m for m in tables.REGION.finditer(doc) if re.search(r"^\|.*\d", m.group("body"), re.M))
    body = m.group("body")
    typed = re.sub(r"^(\|.*?)(\d)", lambda d: d.group(1) + str((int(d.group(2)) + 1) % 10), body, count=1, flags=re.M)
    edited = doc[: m.start("body")] + typed + doc[m.end("body"):]
    assert edited != doc
    assert tables.render_doc(edited) == tables.render_doc(doc)


def test_every_region_names_a_known_table(tables):
    names = [m.group("name") for m in tables.REGION.finditer(DOC.read_text())]
    assert names and set(names) <= set(tables.TABLES)


def test_grid_region_equals_what_grid_jsonl_gives():
    """The grid's table (written by bench/run.py, not bench/tables.py) is checked against its results too."""
    spec = importlib.util.spec_from_file_location("bench_grid_render", ROOT / "bench" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    doc = DOC.read_text()
    region = doc[doc.index(run.START): doc.index(run.END) + len(run.END)]
    assert run.grid_region(run.load_results()) == region, "the grid differs from grid.jsonl: python bench/run.py --render-only"
