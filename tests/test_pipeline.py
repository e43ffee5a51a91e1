"""End to end through the CLI on a tiny model: prune -> recover -> evaluate -> save -> report."""
import json
import re

import pytest
import yaml
import torch
from typer.testing import CliRunner

import shearkit
from shearkit.cli import app
from shearkit.errors import ShearkitError

from conftest import make_tiny

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    m = tiny_model_dir
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. pruning makes language models smaller.\n" * 300)
    instr = tmp_path / "instr.json"
    instr.write_text(json.dumps([{"instruction": "say hello", "input": "", "output": "hello world"}] * 16))
    return tmp_path, m, text, instr


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    return r


def test_structured_prune_recover_eval_save(workspace, monkeypatch):
    tmp, base, text, instr = workspace
    before = sorted(p.stat().st_mtime_ns for p in base.iterdir())
    monkeypatch.chdir(tmp)
    r = invoke("prune", base, "--method", "llm-pruner", "--ratio", "0.3", "--calib", text, "--calib-samples", 4,
               "--calib-seqlen", 16, "--tasks", text, "--eval-seqlen", 16, "--limit", 2, "--recover", 2,
               "--recover-data", instr, "--set", "recover.seqlen=128", "--set", "recover.batch_size=2",
               "--out", "runs/lp30", "--set", "prune.dense_first=0", "--set", "prune.dense_last=0")
    # progress labels count the steps this run takes, each once: load, dense eval, prune, pruned eval,
    # recover, final eval and save
    labels = re.findall(r"\[(\d+)/(\d+)\] ", r.output)
    assert labels == [(str(i), "6") for i in range(1, 7)], r.output
    # the run directory moves: what metrics.json names is found relative to it
    out = tmp / "moved" / "lp30"
    out.parent.mkdir()
    (tmp / "runs" / "lp30").rename(out)
    monkeypatch.chdir(out.parent)
    m = json.loads((out / "metrics.json").read_text())
    assert (out / m["recover"]["plot"]).is_file(), m["recover"]["plot"]
    # env.json records the seeds the recipe used
    env = json.loads((out / "env.json").read_text())
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert env["seeds"] == {f"{s}.seed": recipe[s]["seed"] for s in ("calib", "prune", "recover")}
    assert env["seed"] == recipe["calib"]["seed"] == 0
    # the model card's Measured table: dense, pruned before recovery and this model, all numbers
    card = (out / "model" / "README.md").read_text().split("## Measured", 1)[1]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in card.splitlines() if ln.startswith("|")]
    assert rows[0] == ["task", "metric", "dense", "pruned, before recovery", "recovered (this model)"]
    assert [float(v) for v in rows[2][2:]] == pytest.approx(
        [m["dense"]["tasks"][str(text)]["value"], m["pruned"]["tasks"][str(text)]["value"],
         m["tasks"][str(text)]["value"]], rel=1e-3)
    assert len(rows) == 3 and "None" not in card
    assert abs(m["prune"]["ratio_achieved"] - 0.3) < 0.05
    assert {"dense", "pruned", "tasks", "recover"} <= set(m)
    assert (out / "plan.json").exists() and (out / "recovery" / "train_log.jsonl").exists()
    model, _ = shearkit.load(out / "model", device="cpu")
    assert model.num_parameters() < make_tiny("llama").num_parameters()
    assert sorted(p.stat().st_mtime_ns for p in base.iterdir()) == before  # the input model is untouched
    r = invoke("plan", "show", out / "plan.json")
    assert "total" in r.output


def test_unstructured_prune_keeps_masks_through_recovery(workspace):
    tmp, base, text, instr = workspace
    out = tmp / "run"
    invoke("prune", base, "--method", "wanda", "--ratio", "0.5", "--calib", text, "--calib-samples", 4,
           "--calib-seqlen", 16, "--tasks", text, "--eval-seqlen", 16, "--limit", 2, "--recover", 2,
           "--recover-data", instr, "--set", "recover.seqlen=128", "--set", "recover.batch_size=2", "--out", out)
    assert (out / "masks.safetensors").exists() and (out / "model" / "sparsity" / "masks.safetensors").exists()
    model, _ = shearkit.load(out / "model", device="cpu")
    ad = shearkit.get_adapter(model)
    zeros = sum((b.mlp.output.weight == 0).sum().item() for b in ad.blocks())
    total = sum(b.mlp.output.weight.numel() for b in ad.blocks())
    assert zeros / total == pytest.approx(0.5, abs=0.01)  # recovery did not refill pruned weights
    from shearkit.sparsity.apply import load_masks

    pruned = load_masks(out)  # the zeros pruning made are exactly the zeros saved after recovery
    assert pruned and all(torch.equal(keep, model.get_submodule(n).weight != 0) for n, keep in pruned.items())
    m = json.loads((out / "metrics.json").read_text())
    assert m["recover"]["masked_layers"] == len(pruned)


def test_dry_run_cuts_nothing(workspace):
    tmp, base, text, _ = workspace
    out = tmp / "dry"
    r = invoke("prune", base, "--method", "structured-magnitude", "--ratio", "0.2", "--dry-run", "--out", out)
    assert "achieved" in r.output and (out / "plan.json").exists() and not (out / "model").exists()


@pytest.mark.filterwarnings("error:constrained_layout not applied")  # a task given as a long path squeezed a plot
def test_run_recipe_writes_report(workspace):
    tmp, base, text, instr = workspace
    recipe = tmp / "r.yaml"
    recipe.write_text(f"model: {{name: {base}}}\ncalib: {{dataset: {text}, samples: 4, seqlen: 16}}\n"
                      f"prune: {{method: magnitude, ratio: 0.4}}\neval: {{tasks: [{text}], seqlen: 16, limit: 2}}\n")
    out = tmp / "run"
    invoke("run", recipe, "--out", out)
    assert (out / "report" / "report.html").exists()
    html = (out / "report" / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64" in html


def test_cli_ratio_bounds(workspace):
    tmp, base, _, _ = workspace
    for bad in ("0", "1", "1.5", "-0.2"):
        r = runner.invoke(app, ["prune", str(base), "--method", "wanda", "--ratio", bad, "--out", str(tmp / "x")])
        assert isinstance(r.exception, ShearkitError) and "strictly between 0 and 1" in str(r.exception)
    r = runner.invoke(app, ["prune", str(base), "--method", "wandaa", "--ratio", "0.5", "--out", str(tmp / "y")])
    assert isinstance(r.exception, ShearkitError) and "Did you mean 'wanda'" in str(r.exception)
