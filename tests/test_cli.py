"""The CLI: help without torch, version, one model argument shape, clear errors."""
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from shearkit.cli import app

runner = CliRunner()


def run_cli(*args):
    """Run `shearkit` in a subprocess (through main(), which formats errors)."""
    return subprocess.run([sys.executable, "-c", "from shearkit.cli import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_does_not_import_torch():
    code = ("import sys; sys.argv=['shearkit','--help']\nfrom shearkit.cli import main\ntry: main()\n"
            "except SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "eval" in r.stdout and "bench" in r.stdout


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("shearkit ")


def test_list_shows_families_and_data():
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0
    for word in ("llama", "gpt2", "opt", "wikitext2", "ptb", "c4", "smollm2-135m"):
        assert word in r.stdout


def test_missing_model_is_a_clear_error():
    r = run_cli("eval")
    assert r.returncode == 2 and "No model given" in r.stderr


def test_unknown_model_is_a_clear_error(tmp_path):
    r = run_cli("eval", "no-such-org/no-such-model-xyz", "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "not a built-in name" in r.stderr and "Traceback" not in r.stderr


def test_existing_run_dir_not_overwritten(tmp_path, tiny_model_dir):
    m = tiny_model_dir
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 100)
    out = tmp_path / "run"
    r = run_cli("eval", str(m), "--tasks", str(text), "--seqlen", "32", "--limit", "2", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    (task,) = res
    assert res[task]["metric"] == "ppl_concat" and res[task]["windows"] == 2
    for f in ("metrics.json", "recipe.yaml", "env.json", "run.log"):
        assert (out / f).exists()
    r2 = run_cli("eval", str(m), "--tasks", str(text), "--seqlen", "32", "--limit", "2", "--out", str(out))
    assert r2.returncode == 2 and "--overwrite" in r2.stderr
    r3 = run_cli("eval", "--model", str(m), "--tasks", str(text), "--seqlen", "32", "--limit", "2", "--out", str(out),
                 "--overwrite")
    assert r3.returncode == 0, r3.stderr
    assert "task" in r3.stdout and "ppl_concat" in r3.stdout  # the table


def test_bad_flag_values(tmp_path):
    r = run_cli("eval", "smollm2-135m", "--limit", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--limit must be a positive" in r.stderr
    r = run_cli("eval", "smollm2-135m", "--set", "eval.seqlenn=3", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "Did you mean 'seqlen'" in r.stderr


@pytest.mark.slow
def test_readme_quick_eval(tmp_path, data_dir):
    r = run_cli("eval", "smollm2-135m", "--tasks", "wikitext2", "--seqlen", "512", "--limit", "2", "--out",
                str(tmp_path / "r"), "--json")
    assert r.returncode == 0, r.stderr
    assert 10 < json.loads(r.stdout)["wikitext2"]["value"] < 60


def test_unknown_task_fails_before_loading(tmp_path):
    r = run_cli("eval", "smollm2-135m", "--tasks", "piqaa", "--out", str(tmp_path / "z"))
    assert r.returncode == 2 and "piqa" in r.stderr
    assert not (tmp_path / "z").exists()  # refused before a run directory or a model load
