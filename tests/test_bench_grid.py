"""The benchmark grid runner (bench/run.py): locked result merges, kept models, protocol marks."""
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def grid(tmp_path, monkeypatch):
    """bench/run.py as a module, writing its results and docs under tmp_path."""
    spec = importlib.util.spec_from_file_location("bench_grid_run", ROOT / "bench" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results" / "grid.jsonl")
    monkeypatch.setattr(mod, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(mod, "IMG", tmp_path / "img")
    return mod


def _row(grid, key: str, method: str = "wanda", **protocol) -> dict:
    return {"key": key, "method": method, "ratio": 0.5, "nm": None, "recover_steps": 0, "status": "ok",
            "protocol": {**grid.PROTOCOL, **protocol}, "wikitext2": 60.0, "ptb": 90.0, "wall_s": 1.0,
            "date": "2026-11-30"}


def test_save_row_waits_for_the_results_lock(grid):
    """A second grid process must not read-merge-write the results while another holds the lock."""
    grid.save_row(_row(grid, "a"))
    lock = FileLock(str(grid.RESULTS.with_name(f".{grid.RESULTS.name}.lock")))
    with lock:
        t = threading.Thread(target=grid.save_row, args=(_row(grid, "b"),))
        t.start()
        time.sleep(1.0)
        assert set(grid.load_results()) == {"a"}  # still waiting
    t.join(timeout=30)
    assert set(grid.load_results()) == {"a", "b"}


def test_old_ptb_rows_are_re_evaluated_from_kept_models(grid, tmp_path):
    old = _row(grid, "wanda-r0.5")
    del old["protocol"]["ptb_text"]  # written before the PTB text was recorded
    model = tmp_path / "wanda-r0.5" / "model"
    assert grid.protocol_diff(old) == {"ptb_text"} and not grid.is_current(old)
    assert grid.plan_cell(old, model, False, False, False) == "prune"  # nothing kept: prune again
    assert grid.plan_cell(old, model, False, False, True) == "no-model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert grid.plan_cell(old, model, False, False, False) == "re-evaluate"
    assert grid.plan_cell(_row(grid, "x"), model, False, False, False) == "skip"
    assert grid.plan_cell(_row(grid, "x", calib="wiki"), model, False, False, False) == "prune"


def test_reeval_keeps_pruning_figures_and_records_the_ptb_text(grid, tmp_path, monkeypatch):
    old = {**_row(grid, "wanda-r0.5"), "prune_s": 12.0, "ratio_achieved": 0.5}
    old["protocol"] = {k: v for k, v in old["protocol"].items() if k != "ptb_text"}

    def fake_eval(cmd, budget_s):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"tasks": {
            "wikitext2": {"value": 61.0}, "ptb": {"value": 70.0, "rows": "stripped lines"}}}))

    monkeypatch.setattr(grid, "_shearkit", fake_eval)
    new = grid.reeval_cell(old, 60, tmp_path)
    assert (new["ptb"], new["wikitext2"], new["prune_s"]) == (70.0, 61.0, 12.0)
    assert grid.is_current(new)


def test_table_marks_ptb_figures_on_the_old_text(grid):
    old = _row(grid, "wanda-r0.5")
    del old["protocol"]["ptb_text"]
    new = {**_row(grid, "wanda-r0.6"), "ratio": 0.6, "ptb": 123.45}
    grid.render({r["key"]: r for r in (old, new)})
    doc = grid.DOC.read_text()
    lines = {l.split("|")[2].strip(): l for l in doc.splitlines() if l.startswith("| wanda")}
    assert "90.00 †" in lines["0.5"] and "†" not in lines["0.6"]
    assert "† PTB measured on the old text" in doc


def test_failed_attempt_keeps_the_earlier_measurement(grid):
    grid.save_row(_row(grid, "dense-r0", "dense"))
    grid.save_row({**_row(grid, "dense-r0", "dense"), "status": "timeout", "wikitext2": None, "ptb": None})
    kept = grid.load_results()["dense-r0"]
    assert kept["status"] == "ok" and kept["ptb"] == 90.0 and kept["last_attempt"]["status"] == "timeout"
    grid.save_row({**_row(grid, "dense-r0", "dense"), "ptb": 63.0})
    assert "last_attempt" not in grid.load_results()["dense-r0"]
