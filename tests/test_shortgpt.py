"""ShortGPT (methods/shortgpt.py) and the block-method base (methods/blocks.py): which blocks,
how many, what the plan records, and a result that vanilla transformers loads unchanged."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import shearkit
from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.importance.blocks import block_influence, perplexity_drop
from shearkit.methods.blocks import block_count, lowest

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
PROBE = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))


def test_block_count_follows_the_papers_rounding():
    assert block_count(30, 0.3) == 9 and block_count(30, 0.4) == 12  # SmolLM2-135M at 30% and 40%
    assert block_count(6, 0.25) == 2  # 1.5 rounds up
    assert block_count(6, 0.2) == 1 and block_count(6, 0.2, blocks=4) == 4  # blocks wins over ratio
    with pytest.raises(ShearkitError, match="selects 0 of the model's 30 blocks.*between 1 and 29"):
        block_count(30, 0.01)
    with pytest.raises(ShearkitError, match="prune.blocks=3 selects 3 of the model's 3 blocks"):
        block_count(3, 0.2, blocks=3)
    assert lowest([0.5, 0.1, 0.3, 0.1], 2) == [1, 3] and lowest([0.2, 0.2, 0.9], 1) == [0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shortgpt_removes_the_lowest_bi_blocks(family):
    dense = make_tiny(family)
    bi = block_influence(dense, CALIB)
    model = copy.deepcopy(dense)
    plan = shearkit.prune(model, None, "shortgpt", calib=CALIB, blocks=2)
    assert plan.kind == "blocks" and plan.blocks == lowest(bi, 2)
    assert plan.extra["block_scores"]["bi"] == pytest.approx(bi, abs=1e-9)
    assert plan.ratio_target == pytest.approx(2 / 3) and plan.config["blocks"] == 2
    kept = [i for i in range(3) if i not in plan.blocks][0]
    kept_params = sum(p.numel() for p in get_adapter(dense).layers[kept].parameters())
    assert plan.ratio_achieved == pytest.approx(1 - kept_params / get_adapter(dense).block_param_count())
    assert model.config.num_hidden_layers == 1
    left, orig = get_adapter(model).layers[0].state_dict(), get_adapter(dense).layers[kept].state_dict()
    assert left.keys() == orig.keys() and all(torch.equal(left[k], orig[k]) for k in orig)  # the kept block as it was


def test_perplexity_importance_removes_the_least_missed_block():
    dense = make_tiny("opt")
    drop = perplexity_drop(dense, CALIB[:2])
    plan = shearkit.prune(copy.deepcopy(dense), None, "shortgpt", 1 / 3, calib=CALIB, importance="ppl",
                          ppl_samples=2)
    assert plan.blocks == lowest(drop, 1) and plan.extra["block_scores"]["ppl"] == pytest.approx(drop)


def test_result_is_a_plain_model_vanilla_transformers_loads(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny("qwen2")
    plan = shearkit.prune(model, tiny_tokenizer, "shortgpt", 0.34, calib=CALIB)
    with torch.no_grad():
        want = model(input_ids=PROBE).logits
    out = shearkit.save(model, tiny_tokenizer, tmp_path / "m", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(plain).__module__.startswith("transformers.models.qwen2")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=PROBE).logits, want)


def test_bad_block_options_are_refused():
    with pytest.raises(ShearkitError, match="prune.blocks must be a whole number"):
        shearkit.prune(make_tiny("llama"), None, "shortgpt", calib=CALIB, blocks=0)
    with pytest.raises(ShearkitError, match="prune.importance must be one of bi, ppl"):
        shearkit.prune(make_tiny("llama"), None, "shortgpt", calib=CALIB, importance="cos")
    with pytest.raises(ShearkitError, match=r"prune.save_every must be >= 0 blocks \(0: no checkpoints\), got -1"):
        shearkit.prune(make_tiny("llama"), None, "shortgpt", calib=CALIB, blocks=1, save_every=-1)
    with pytest.raises(ShearkitError, match="applies only to block methods \\(flexigpt, shortgpt\\)"):
        shearkit.prune(make_tiny("llama"), None, "llm-pruner", calib=CALIB, blocks=1)


@pytest.mark.parametrize("how", [["--blocks", "1"], ["--set", "prune.blocks=1"]])
def test_command_line_block_count(how, tiny_model_dir, tmp_path):
    from shearkit.cli import app

    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. pruning makes language models smaller.\n" * 100)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "--method", "shortgpt", *how, "--calib", str(text),
                                 "--calib-samples", "2", "--calib-seqlen", "16", "--tasks", str(text),
                                 "--eval-seqlen", "16", "--limit", "1", "--no-dense-eval", "--out", str(out)])
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["kind"] == "blocks" and len(plan["blocks"]) == 1 and plan["ratio_target"] == pytest.approx(1 / 3)
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    if how[0] == "--blocks":  # the run's report plots the score of every block
        from shearkit.report import write_report

        rep = write_report(out)
        md = (rep / "report.md").read_text()
        assert "block scores by layer" in md and (rep / "figures" / "extra-block-scores.png").is_file()
        assert f"| {plan['blocks'][0]} | removed |" in md
        shown = CliRunner().invoke(app, ["plan", "show", str(out / "plan.json")], env={"COLUMNS": "200"}).output
        assert "score (bi)" in shown and shown.count("removed") == 2 and shown.count("kept") == 2  # + "blocks removed:"
