"""The CLI: help without torch, version, one model argument shape, clear errors."""
import json
import os
import shutil
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


# every kind of usage error: (arguments, what the message says)
USAGE_ERRORS = [
    (("eval", "smollm2-135m", "--bogus"), "No such option: --bogus"),
    (("generate",), "Missing argument"),
    (("prune", "smollm2-135m", "--method", "wanda", "--ratio", "abc"), "Invalid value for '--ratio'"),
    (("frobnicate",), "No such command 'frobnicate'"),
]


def _entry_point() -> str:
    exe = shutil.which("shearkit", path=os.path.dirname(sys.executable)) or shutil.which("shearkit")
    if exe is None:
        pytest.skip("the `shearkit` console script is not installed (pip install -e .)")
    return exe


@pytest.mark.parametrize("args,says", USAGE_ERRORS, ids=["unknown-option", "missing-argument", "not-a-number",
                                                         "unknown-command"])
def test_usage_errors_print_usage_and_exit_2(args, says):
    for r in (run_cli(*args),
              subprocess.run([_entry_point(), *args], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})):
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert "Usage: " in r.stderr and "--help" in r.stderr and says in r.stderr, r.stderr


@pytest.mark.parametrize("args,says", USAGE_ERRORS[:2])
def test_usage_errors_through_main_in_process(args, says, monkeypatch, capsys):
    from shearkit.cli import main

    monkeypatch.setattr(sys, "argv", ["shearkit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Usage: " in err and says in err


def test_nm_with_a_structured_method_names_the_methods_that_take_it(tmp_path):
    r = run_cli("prune", "smollm2-135m", "--method", "llm-pruner", "--nm", "2:4", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Unknown key" not in r.stderr
    assert "N:M sparsity (--nm / prune.nm) applies only to unstructured methods" in r.stderr, r.stderr
    assert "'llm-pruner' is structured" in r.stderr and "wanda" in r.stderr and "sparsegpt" in r.stderr
    assert "besa" not in r.stderr.split("takes it:")[-1]  # BESA refuses N:M itself
    assert not (tmp_path / "x").exists()


def test_nm_in_a_recipe_with_a_structured_method():
    from shearkit.errors import ShearkitError
    from shearkit.recipe import load_recipe

    with pytest.raises(ShearkitError, match="applies only to unstructured methods.*magnitude"):
        load_recipe(None, extra={"prune": {"method": "structured-magnitude", "nm": "2:4"}})
    assert load_recipe(None, extra={"prune": {"method": "wanda", "nm": "2:4"}}).get("prune").ratio == 0.5


@pytest.mark.parametrize("exc", ["cuda", "host"])
def test_out_of_memory_says_what_to_lower(exc, tmp_path, tiny_model_dir, text_file, monkeypatch, capsys):
    """Running out of memory mid-run ends in one clear line naming the batch-size knobs, exit 2, and a
    run directory marked failed (not a traceback from deep inside torch)."""
    import json

    import torch

    from shearkit import api
    from shearkit.cli import main

    def boom(*a, **k):
        if exc == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise MemoryError()

    monkeypatch.setattr(api, "evaluate", boom)
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["shearkit", "eval", str(tiny_model_dir), "--tasks", str(text_file),
                                      "--seqlen", "16", "--out", str(out), "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("Out of memory on the GPU (CUDA out of memory" if exc == "cuda" else "Out of memory in host memory") in err
    assert "--batch-size" in err and "grad_accum" in err and "calib.samples" in err
    assert json.loads((out / ".shearkit-run").read_text())["status"] == "failed"


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    from shearkit.errors import out_of_memory

    assert out_of_memory(RuntimeError("shape mismatch")) is None
    assert out_of_memory(ValueError("x")) is None
