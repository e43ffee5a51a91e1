"""docs/errors.md lists every user-facing error in the code, each with a test that raises it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from shearkit.errors import ShearkitError

from conftest import errors_doc

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def doc():
    return errors_doc()


@pytest.fixture(scope="module")
def sites(doc):
    s = doc.find_sites()
    doc.attach_tests(s, doc.load_mapping())
    return s


def test_errors_page_is_current(doc, sites):
    assert (ROOT / "docs" / "errors.md").read_text(encoding="utf-8") == doc.render_doc(sites), \
        "docs/errors.md is out of date: run `python tools/errors_doc.py`"


def test_every_error_has_a_test(sites):
    missing = [f"{s.file}:{s.line} {s.message[:80]}" for s in sites if not s.tests]
    assert not missing, f"{len(missing)} errors without a test, e.g.:\n" + "\n".join(missing[:15])


def test_the_mapping_names_only_errors_and_tests_that_exist(doc, sites):
    ids = {s.id for s in sites}
    mapping = doc.load_mapping()
    assert set(mapping) <= ids, f"errors no longer in the code: {sorted(set(mapping) - ids)[:5]}"
    for tests in mapping.values():
        for t in tests:
            file, *names = re.sub(r"\[.*\]$", "", t).split("::")
            source = (ROOT / file).read_text(encoding="utf-8")
            assert re.search(rf"^\s*def {re.escape(names[-1])}\(", source, re.M), f"{t} does not exist"


def test_a_raised_error_is_traced_to_the_line_that_raised_it(doc, tmp_path, monkeypatch):
    from shearkit.methods import get_method

    hits = tmp_path / "hits.jsonl"
    monkeypatch.setenv("SHEARKIT_RECORD_ERRORS", str(hits))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/x.py::test_y (call)")
    with pytest.raises(ShearkitError, match="Unknown method"):
        get_method("no-such-method")
    found = doc.read_hits(hits, doc.find_sites())
    assert list(found.values()) == [{"tests/x.py::test_y"}]
    (sid,) = found
    assert sid.startswith("methods/__init__.py:get_method:")


def test_message_templates_keep_the_literal_text_and_mark_the_rest(doc):
    import ast

    call = ast.parse('ShearkitError(f"Ratio {ratio} is out of range; " "choose one in (0, 1).")').body[0].value
    assert doc.render(call.args[0]) == "Ratio {ratio} is out of range; choose one in (0, 1)."
