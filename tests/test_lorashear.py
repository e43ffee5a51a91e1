"""LoRAShear end to end on tiny models: knowledge distribution -> LHSPG -> removal -> dynamic recovery;
both LHSPG variants reach the same group sparsity; a killed run resumes to the same result."""
import copy
import json

import pytest
import torch

import shearkit
from shearkit.errors import ShearkitError

from conftest import make_tiny

SMALL = {"gamma": 0.34, "analysis_windows": 2, "analysis_seqlen": 16, "periods": 2, "warmup": 0.25,
         "train": {"steps": 6, "seqlen": 256, "batch_size": 2, "save_every": 2},
         "recovery": {"steps": 4, "seqlen": 256, "batch_size": 2, "save_every": 2},
         "dynamic": {"round_steps": 2, "heldout_windows": 2, "heldout_seqlen": 16, "heldout_examples": 2}}


def _prune(model, tok, data_dir, run_dir=None, resume=False, ratio=0.25, **opts):
    return shearkit.prune(model, tok, "lorashear", ratio, data_dir=data_dir, run_dir=run_dir, resume=resume,
                          **{**copy.deepcopy(SMALL), **opts})


def _removed(plan):
    return {k: (len(v.get("kv_groups", [])), len(v.get("mlp_channels", []))) for k, v in plan.layers.items()}


def test_the_whole_pipeline_reaches_the_target(tiny_tokenizer, data_dir, tmp_path):
    model = make_tiny("llama")
    plan = _prune(model, tiny_tokenizer, data_dir, run_dir=tmp_path)
    assert plan.method == "lorashear" and plan.ratio_target == 0.25
    assert 0.25 <= plan.ratio_achieved < 0.35
    lh = plan.extra["lhspg"]
    quotas = {k: v for k, v in lh["quotas"].items()}
    got = {}
    for layer, e in plan.layers.items():
        if e.get("kv_groups"):
            got[f"kv_group.{layer}"] = len(e["kv_groups"])
        if e.get("mlp_channels"):
            got[f"mlp_channel.{layer}"] = len(e["mlp_channels"])
    assert got == quotas  # every node group lost exactly its target
    # the most sensitive node group (gamma 0.34 of 6 -> 3 kept whole) is not cut
    kept = plan.extra["unprunable"]
    assert len(kept) == 3 and not any(k.replace("attn", "kv_group").replace("mlp", "mlp_channel") in quotas
                                      for k in kept)
    assert lh["train"]["steps_done"] == 6 and plan.extra["recovery"]["rounds"]
    for f in ("lorashear/knowledge_distribution.json", "lorashear/knowledge_distribution.png",
              "lorashear/dense_reference.json", "lhspg/train_log.jsonl", "dynamic-recovery/train_log.jsonl",
              "dynamic-recovery/mix.png"):
        assert (tmp_path / f).is_file(), f
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_both_variants_reach_the_same_group_sparsity(tiny_tokenizer, data_dir):
    base = make_tiny("llama")
    paper = _prune(copy.deepcopy(base), tiny_tokenizer, data_dir)
    decay = _prune(copy.deepcopy(base), tiny_tokenizer, data_dir, variant="decay")
    assert _removed(paper) == _removed(decay)
    assert paper.ratio_achieved == decay.ratio_achieved


def test_gamma_zero_skips_the_analysis(tiny_tokenizer, data_dir, tmp_path):
    plan = _prune(make_tiny("llama"), tiny_tokenizer, data_dir, run_dir=tmp_path, gamma=0.0)
    assert "knowledge_distribution" not in plan.extra and plan.ratio_achieved >= 0.25
    assert not (tmp_path / "lorashear" / "knowledge_distribution.json").exists()


def test_dense_layers_stay_whole_and_the_others_carry_the_ratio(tiny_tokenizer, data_dir):
    plan = _prune(make_tiny("llama"), tiny_tokenizer, data_dir, gamma=0.0, dense_first=1)
    assert "0" not in plan.layers and plan.ratio_achieved >= 0.25


@pytest.mark.parametrize("stage", ["lhspg", "recovery"])
def test_kill_and_resume_gives_the_same_model(tiny_tokenizer, data_dir, tmp_path, monkeypatch, stage):
    """A run stopped hard inside LHSPG (its base-weight writes included) or inside recovery, then resumed,
    ends with the plan and weights of an uninterrupted run."""
    from shearkit.recovery.loop import Trainer

    dense = make_tiny("llama")
    whole = copy.deepcopy(dense)
    ref = _prune(whole, tiny_tokenizer, data_dir, run_dir=tmp_path / "a")
    real = Trainer._save

    kill_at = {"lhspg": ("lhspg", 4), "recovery": ("dynamic recovery", 2)}[stage]

    def killed(self, step):
        real(self, step)
        if (self.desc, step) == kill_at:
            raise KeyboardInterrupt  # as a kill: nothing after this checkpoint is saved

    monkeypatch.setattr(Trainer, "_save", killed)
    with pytest.raises(KeyboardInterrupt):
        _prune(copy.deepcopy(dense), tiny_tokenizer, data_dir, run_dir=tmp_path / "b")
    monkeypatch.setattr(Trainer, "_save", real)
    resumed = copy.deepcopy(dense)
    plan = _prune(resumed, tiny_tokenizer, data_dir, run_dir=tmp_path / "b", resume=True)
    assert plan.layers == ref.layers
    assert plan.extra["lhspg"]["history"] == ref.extra["lhspg"]["history"]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("opts, match", [
    ({"gamma": 1.0}, "prune.gamma"),
    ({"variant": "sgd"}, "prune.variant"),
    ({"proxy": "lora"}, "prune.proxy"),
    ({"periods": 0}, "prune.periods"),
    ({"train": {"steps": 2}}, "no step per LHSPG period"),
    ({"train": {"data": "c4"}}, "dynamic.phases"),
    ({"recovery": {"rank": 4}}, "prune.recovery.rank"),
    ({"dynamic": {"phases": [["c4"], ["c4"]]}}, "more than once"),
    ({"saliency": {"hessian": 1.0}}, "saliency proxy"),
    ({"attn_unit": "query_heads"}, "kv_group or none"),
])
def test_bad_options_are_refused_before_any_work(opts, match):
    with pytest.raises(ShearkitError, match=match):
        shearkit.prune(make_tiny("llama"), None, "lorashear", 0.2, **opts)


def test_command_line(tiny_model_dir, tmp_path, data_dir):
    """`shearkit prune MODEL --method lorashear` runs the pipeline, saves, and the model reloads."""
    from typer.testing import CliRunner

    from shearkit.cli import app

    out = tmp_path / "run"
    args = ["prune", str(tiny_model_dir), "--method", "lorashear", "--ratio", "0.25", "--tasks", "wikitext2",
            "--limit", "2", "--eval-seqlen", "32", "--no-dense-eval", "--out", str(out), "--data-dir", str(data_dir)]
    sets = {"gamma": 0.34, "analysis_windows": 2, "analysis_seqlen": 16, "periods": 2, "warmup": 0.25,
            "train.steps": 6, "train.seqlen": 256, "train.batch_size": 2, "recovery.steps": 2,
            "recovery.seqlen": 256, "recovery.batch_size": 2, "dynamic.round_steps": 1,
            "dynamic.heldout_windows": 2, "dynamic.heldout_seqlen": 16, "dynamic.heldout_examples": 2}
    for k, v in sets.items():
        args += ["--set", f"prune.{k}={v}"]
    args += ["--recover", "1", "--set", "recover.seqlen=256", "--set", "recover.batch_size=1",
             "--set", "recover.save_every=1", "--set", "prune.train.save_every=2",
             "--set", "prune.recovery.save_every=1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "lorashear" and plan["ratio_achieved"] >= 0.25
    model, _ = shearkit.load(out / "model", device="cpu")
    assert (out / "dynamic-recovery" / "mix.json").is_file() and (out / "recovery" / "train_log.jsonl").is_file()
    # --resume on the finished run: every stage finds its last checkpoint; the same plan and weights
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "plan.json").read_text())["layers"] == plan["layers"]
    model2, _ = shearkit.load(out / "model", device="cpu")
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    refused = CliRunner().invoke(app, [*args, "--resume", "--overwrite"])
    assert refused.exit_code != 0 and "contradict" in str(refused.exception)
