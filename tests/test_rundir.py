"""Run directories: a marker says shearkit made them and how the run ended; a run that stopped before
any result does not block its rerun; --overwrite deletes only shearkit run directories, never the
working or home directory or an input; data is checked before anything is loaded; files follow the umask."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shearkit.errors import ShearkitError
from shearkit.runs import MARKER, RunDir, read_marker


def run_cli(*args, env=None, unset=()):
    """`shearkit` in a subprocess, through main() (which formats errors)."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    for k in unset:
        e.pop(k, None)
    return subprocess.run([sys.executable, "-c", "from shearkit.cli import main; main()", *args],
                          capture_output=True, text=True, env=e)


def _finished_run(path: Path, fail: bool = False) -> Path:
    """A run directory as a command leaves it: recipe, metrics, then success or an exception."""
    try:
        with RunDir(path, "eval") as run:
            (run.path / "recipe.yaml").write_text("model: {name: x}\n")
            run.write_env("cpu", 0)
            run.write_metrics({"tasks": {}})
            if fail:
                raise RuntimeError("boom")
    except RuntimeError:
        pass
    return path


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- the marker and reruns (item 7) --------------------------------------------------------------

def test_marker_records_how_the_run_ended(tmp_path):
    assert read_marker(_finished_run(tmp_path / "ok"))["status"] == "complete"
    assert read_marker(_finished_run(tmp_path / "bad", fail=True))["status"] == "failed"
    with pytest.raises(KeyboardInterrupt):
        with RunDir(tmp_path / "int", "eval"):
            raise KeyboardInterrupt
    assert read_marker(tmp_path / "int")["status"] == "interrupted"


def test_run_stopped_before_any_result_is_replaced_by_the_rerun(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ShearkitError):
        with RunDir(out, "eval") as run:
            run.write_env("cpu", 0)
            raise ShearkitError("the model path is wrong")
    assert read_marker(out)["status"] == "failed"
    with RunDir(out, "eval") as run:  # no --overwrite needed
        run.write_metrics({"ok": 1})
    assert read_marker(out)["status"] == "complete"


def test_unfinished_run_with_results_needs_overwrite(tmp_path):
    out = _finished_run(tmp_path / "run", fail=True)
    with pytest.raises(ShearkitError, match="unfinished eval run .*--overwrite"):
        RunDir(out, "eval")
    assert (out / "metrics.json").exists()
    with RunDir(out, "eval", overwrite=True):
        pass
    assert not (out / "metrics.json").exists()


def test_complete_run_needs_overwrite(tmp_path):
    out = _finished_run(tmp_path / "run")
    with pytest.raises(ShearkitError, match="already exists.*--overwrite"):
        RunDir(out, "eval")
    with RunDir(out, "eval", overwrite=True):
        pass
    assert not (out / "metrics.json").exists() and read_marker(out)["status"] == "complete"


def test_run_being_written_by_a_live_process_is_refused(tmp_path):
    out = _finished_run(tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        marker = json.loads((out / MARKER).read_text())
        (out / MARKER).write_text(json.dumps({**marker, "status": "running", "pid": other.pid}))
        with pytest.raises(ShearkitError, match=f"another shearkit process \\(pid {other.pid}"):
            RunDir(out, "eval", overwrite=True)
        assert (out / "metrics.json").exists()
    finally:
        other.kill()
        other.wait()
    with RunDir(out, "eval", overwrite=True):  # the writer is gone
        pass


def test_cli_rerun_after_a_bad_model_path(tmp_path, tiny_model_dir):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    model, out = tmp_path / "later", tmp_path / "run"
    args = ("eval", str(model), "--tasks", str(text), "--seqlen", "32", "--limit", "2", "--out", str(out))
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    shutil.copytree(tiny_model_dir, model)  # the user fixes the path and runs the same command again
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert read_marker(out)["status"] == "complete" and (out / "metrics.json").exists()


# -- what --overwrite may delete (item 10) -------------------------------------------------------

def test_overwrite_refuses_a_folder_shearkit_did_not_create(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ShearkitError, match="not a shearkit run directory"):
        RunDir(mine, "eval", overwrite=True)
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_overwrite_replaces_a_run_directory_from_before_the_marker(tmp_path):
    old = _finished_run(tmp_path / "old")
    (old / MARKER).unlink()
    with pytest.raises(ShearkitError, match="--overwrite"):
        RunDir(old, "eval")
    with RunDir(old, "eval", overwrite=True):  # its run.log and shearkit's env.json say what it is
        pass
    assert not (old / "metrics.json").exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "run.log").write_text("mine")
    (fake / "env.json").write_text("{}")
    with pytest.raises(ShearkitError, match="not a shearkit run directory"):
        RunDir(fake, "eval", overwrite=True)


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch):
    out = _finished_run(tmp_path / "run")
    monkeypatch.chdir(out)
    for target in (out, Path("."), tmp_path):  # the folder itself, by a relative name, a parent of it
        with pytest.raises(ShearkitError, match="working directory"):
            RunDir(target, "eval", overwrite=True, inputs=[])
    assert (out / "metrics.json").exists()


def test_overwrite_refuses_a_home_directory(tmp_path, monkeypatch):
    home = _finished_run(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShearkitError, match="home directory"):
        RunDir(home, "eval", overwrite=True)
    assert (home / "metrics.json").exists()


def test_overwrite_refuses_a_parent_of_an_input(tmp_path):
    out = _finished_run(tmp_path / "run")
    (out / "model").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(ShearkitError, match="an input of this run"):
        RunDir(out, "eval", overwrite=True, inputs=[str(out / "model")])
    with pytest.raises(ShearkitError, match="an input of this run"):
        RunDir(tmp_path, "eval", overwrite=True, inputs=[str(data)])
    assert (out / "model").is_dir()


def test_cli_overwrite_refuses_the_folder_of_the_input_model(tmp_path, tiny_model_dir):
    out = _finished_run(tmp_path / "run")
    shutil.copytree(tiny_model_dir, out / "model")
    text = tmp_path / "t.txt"
    text.write_text("some text to evaluate on\n" * 50)
    r = run_cli("eval", str(out / "model"), "--tasks", str(text), "--seqlen", "16", "--limit", "1",
                "--out", str(out), "--overwrite")
    assert r.returncode == 2 and "an input of this run" in r.stderr, r.stderr
    assert (out / "model" / "config.json").exists()


def _eval_run_dir(path: Path) -> Path:
    path.mkdir()
    (path / "metrics.json").write_text(json.dumps({"model": "tiny", "tasks": {"wikitext2": {
        "metric": "ppl_concat", "value": 40.0, "ppl": 40.0, "seqlen": 512, "limit": 8}}}))
    return path


def test_cli_report_needs_overwrite_to_replace_a_report(tmp_path):
    run = _eval_run_dir(tmp_path / "ev")
    assert run_cli("report", str(run)).returncode == 0
    before = (run / "report" / "report.md").stat().st_mtime_ns
    r = run_cli("report", str(run))
    assert r.returncode == 2 and "already holds a report" in r.stderr and "--overwrite" in r.stderr
    assert (run / "report" / "report.md").stat().st_mtime_ns == before
    r = run_cli("report", str(run), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (run / "report" / "report.md").stat().st_mtime_ns != before
    r = run_cli("report", str(run), "--out", str(tmp_path), "--overwrite")  # holds the run itself
    assert r.returncode == 2 and "Traceback" not in r.stderr and run.is_dir()
    (run / "report" / "notes.txt").write_text("mine")  # a file of the user's beside the report
    r = run_cli("report", str(run), "--overwrite")
    assert r.returncode == 2 and "notes.txt" in r.stderr and "Traceback" not in r.stderr
    assert (run / "report" / "notes.txt").read_text() == "mine"


# -- data before anything else (item 8) ----------------------------------------------------------

@pytest.fixture
def no_data_dir(monkeypatch):
    """No $SHEARKIT_DATA, and any model load fails the test."""
    import shearkit.api

    monkeypatch.delenv("SHEARKIT_DATA", raising=False)

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(shearkit.api, "load", no_load)


def test_eval_without_data_dir_fails_offline_before_loading(tmp_path, monkeypatch, no_data_dir):
    from shearkit.cli.core import run_eval
    from shearkit.recipe import load_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = load_recipe(None, extra={"model": {"name": "smollm2-135m"}, "eval": {"tasks": "wikitext2"}})
    with pytest.raises(ShearkitError, match=r"no data directory is set .*hub is switched off"):
        run_eval(r, str(tmp_path / "run"), False)
    assert not (tmp_path / "run").exists()


def test_hub_unreachable_is_reported_before_loading(tmp_path, monkeypatch, no_data_dir):
    from shearkit.data import availability
    from shearkit.pipeline import run_pipeline
    from shearkit.recipe import load_recipe

    for v in availability.OFFLINE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(availability, "hub_unreachable_reason", lambda *a: "ConnectError: no route")
    text = tmp_path / "t.txt"
    text.write_text("words to evaluate\n" * 20)
    r = load_recipe(None, extra={"model": {"name": "smollm2-135m"}, "prune": {"method": "wanda", "ratio": 0.5},
                                 "calib": {"dataset": "c4"}, "eval": {"tasks": str(text)}})
    with pytest.raises(ShearkitError, match=r"Data set 'c4' \(calibration\).*hub is unreachable"):
        run_pipeline(r, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_recovery_data_checked_before_loading(tmp_path, no_data_dir):
    from shearkit.pipeline import run_pipeline
    from shearkit.recipe import load_recipe

    text = tmp_path / "t.txt"
    text.write_text("words to evaluate\n" * 20)
    r = load_recipe(None, extra={"model": {"name": "smollm2-135m"},
                                 "prune": {"method": "structured-magnitude", "ratio": 0.2},
                                 "recover": {"steps": 2, "data": "alpaca"}, "eval": {"tasks": str(text)}})
    with pytest.raises(ShearkitError, match="Instruction set 'alpaca'.*no data directory"):
        run_pipeline(r, out=str(tmp_path / "run"))
    r = load_recipe(None, extra={"model": {"name": "smollm2-135m"}, "recover": {"steps": 2, "data": str(tmp_path / "x.jsonl")},
                                 "eval": {"tasks": str(text)}})
    with pytest.raises(ShearkitError, match="not found"):
        run_pipeline(r, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_cli_without_data_dir_fails_fast_when_the_hub_cannot_be_reached(tmp_path):
    """Online but with no way to the hub (a closed local port as the endpoint): an immediate error, no retries."""
    t0 = time.perf_counter()
    r = run_cli("eval", "smollm2-135m", "--tasks", "wikitext2", "--limit", "1", "--out", str(tmp_path / "run"),
                env={"HF_ENDPOINT": "http://127.0.0.1:9"}, unset=("SHEARKIT_DATA", "HF_HUB_OFFLINE",
                                                                   "HF_DATASETS_OFFLINE"))
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2 and "hub is unreachable" in r.stderr, r.stderr
    assert "Loading weights" not in r.stderr and not (tmp_path / "run").exists()
    assert elapsed < 40, f"took {elapsed:.0f} s"  # before: ~30 s of hub retries, then a model load


# -- permissions follow the umask (item 11) ------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path, umask_022):
    from shearkit.io.atomic import atomic_dir, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "folder") == 0o755
    os.umask(0o077)
    write_json(tmp_path / "b.json", {"x": 1})
    assert _mode(tmp_path / "b.json") == 0o600


def test_saved_model_and_run_directory_are_readable_by_others(tmp_path, tiny_llama, tiny_tokenizer, umask_022):
    import torch

    from shearkit.io.save import save
    from shearkit.recovery.trainlog import TrainLog, plot_losses
    from shearkit.sparsity.apply import save_masks

    out = save(tiny_llama, tiny_tokenizer, tmp_path / "model")
    assert _mode(out) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}
    with RunDir(tmp_path / "run", "eval") as run:
        run.write_metrics({"x": 1})
        log = TrainLog(run.path / "recovery" / "train_log.jsonl")
        log.append({"step": 1, "loss": 2.0})
        plot_losses(log.records, run.path / "loss.png")
        save_masks({"model.layers.0.mlp.up_proj": torch.rand(8, 16) > 0.5}, run.path)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert "masks.safetensors" in {p.name for p in files}
    assert {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}


def test_builtin_model_cache_follows_the_umask(tmp_path, monkeypatch, tiny_llama, umask_022):
    """The built-in model cache is shared by everyone on the machine; transformers writes its weights 0600."""
    from shearkit.models import builtin

    monkeypatch.setattr(builtin, "_download_gguf", lambda spec, work: work / "model.gguf")
    monkeypatch.setattr(builtin, "_convert_gguf_dir", lambda gguf, out, source: tiny_llama.save_pretrained(out))
    target = builtin.builtin_path("smollm2-135m", cache_dir=tmp_path)
    files = [p for p in target.rglob("*") if p.is_file()]
    assert "model.safetensors" in {p.name for p in files}
    assert _mode(target) == 0o755 and {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}
