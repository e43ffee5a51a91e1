"""LoRAPrune end to end on tiny models: the schedule reaches the target, options behave, resume is exact."""
import copy
import json

import pytest
import torch

import shearkit
from shearkit.errors import ShearkitError
from shearkit.methods import get_method

from conftest import make_tiny

TRAIN = {"steps": 8, "data": "ptb", "split": "validation", "seqlen": 16, "batch_size": 2, "save_every": 2}


def _prune(model, tok, data_dir, run_dir=None, resume=False, **opts):
    opts = {"train": dict(TRAIN), "prune_every": 2, **opts}
    return shearkit.prune(model, tok, "loraprune", 0.3, data_dir=data_dir, run_dir=run_dir, resume=resume, **opts)


def test_schedule_prunes_progressively_to_the_target(tiny_tokenizer, data_dir, tmp_path):
    model = make_tiny("llama")
    plan = _prune(model, tiny_tokenizer, data_dir, run_dir=tmp_path)
    sched = plan.extra["schedule"]
    achieved = [s["ratio_achieved"] for s in sched]
    assert len(sched) >= 2 and achieved == sorted(achieved) and achieved[0] < 0.3 <= achieved[-1]
    assert plan.ratio_target == 0.3 and plan.ratio_achieved == pytest.approx(achieved[-1])
    assert plan.extra["train"]["steps_done"] == TRAIN["steps"]
    assert (tmp_path / "loraprune" / "train_log.jsonl").is_file()
    # the first layer (int(0.1 x 3) = 0 layers) and the last are LoRAPrune's dense ones
    assert "2" not in plan.layers and plan.extra["dense_layers"] == [2]


def test_kill_and_resume_gives_the_same_masks_and_weights(tiny_tokenizer, data_dir, tmp_path, monkeypatch):
    """A run stopped hard mid-training (after a prune) and resumed ends like an uninterrupted one."""
    from shearkit.methods.loraprune import LoRAPruneScores

    dense = make_tiny("llama")
    whole = copy.deepcopy(dense)
    ref = _prune(whole, tiny_tokenizer, data_dir, run_dir=tmp_path / "a")

    real = LoRAPruneScores.on_step_end

    def killed(self, trainer, step, record):
        real(self, trainer, step, record)
        if step == 5:
            raise KeyboardInterrupt  # as a kill: nothing after this step is saved

    monkeypatch.setattr(LoRAPruneScores, "on_step_end", killed)
    with pytest.raises(KeyboardInterrupt):
        _prune(copy.deepcopy(dense), tiny_tokenizer, data_dir, run_dir=tmp_path / "b")
    monkeypatch.setattr(LoRAPruneScores, "on_step_end", real)
    assert (tmp_path / "b" / "loraprune" / "checkpoint-4").is_dir()
    resumed = copy.deepcopy(dense)
    plan = _prune(resumed, tiny_tokenizer, data_dir, run_dir=tmp_path / "b", resume=True)
    assert plan.layers == ref.layers and plan.extra["schedule"] == ref.extra["schedule"]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_allocation_and_moving_average_options(tiny_tokenizer, data_dir):
    base = make_tiny("llama")
    uni = _prune(copy.deepcopy(base), tiny_tokenizer, data_dir, allocation="uniform")
    glob = _prune(copy.deepcopy(base), tiny_tokenizer, data_dir)
    raw = _prune(copy.deepcopy(base), tiny_tokenizer, data_dir, ema=0.0)
    assert uni.config["allocation"] == "uniform"
    layer0, layer1 = uni.layers["0"], uni.layers["1"]  # the prunable layers lose the same widths
    assert len(layer0["mlp_channels"]) == len(layer1["mlp_channels"]) > 0
    assert len(layer0["kv_groups"]) == len(layer1["kv_groups"])
    for p in (uni, glob, raw):
        assert p.ratio_achieved >= 0.3
    assert raw.config["ema"] == 0.0
    # per-module normalised scores rank within a set only: used with uniform allocation, not global
    assert uni.extra["normalized_scores"] is True and glob.extra["normalized_scores"] is False


def test_the_model_trains_while_it_prunes(tiny_tokenizer, data_dir):
    """The merged LoRA update changes the kept weights (LoRAPrune fine-tunes as it prunes)."""
    dense = make_tiny("llama")
    model = copy.deepcopy(dense)
    plan = _prune(model, tiny_tokenizer, data_dir)
    sliced = shearkit.apply_plan(copy.deepcopy(dense), plan, check=False)
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, sliced(ids).logits)
    assert plan.extra["train"]["loss_last"] is not None


@pytest.mark.parametrize("opts, match", [
    ({"ema": 1.0}, "prune.ema"),
    ({"warmup": 0.6, "cooldown": 0.5}, "warmup and prune.cooldown"),
    ({"attn_unit": "query_heads"}, "kv_group or none"),
    ({"train": {"rank": 4}}, "prune.train.rank"),
    ({"train": {"steps": 0}}, "steps"),
    ({"prune_every": 0}, "prune_every"),
])
def test_bad_options_are_refused_before_any_work(opts, match):
    with pytest.raises(ShearkitError, match=match):
        shearkit.prune(make_tiny("llama"), None, "loraprune", 0.2, **opts)


def test_command_line(tiny_model_dir, tmp_path, data_dir):
    """`shearkit prune MODEL --method loraprune` prunes, saves, and the saved model reloads."""
    from typer.testing import CliRunner

    from shearkit.cli import app

    out = tmp_path / "run"
    args = ["prune", str(tiny_model_dir), "--method", "loraprune", "--ratio", "0.25", "--tasks", "wikitext2",
            "--limit", "2", "--eval-seqlen", "32", "--no-dense-eval", "--out", str(out), "--data-dir", str(data_dir)]
    for k, v in {"train.steps": 4, "train.data": "ptb", "train.split": "validation", "train.seqlen": 16,
                 "train.batch_size": 2, "prune_every": 2}.items():
        args += ["--set", f"prune.{k}={v}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "loraprune" and plan["ratio_achieved"] >= 0.25
    assert (out / "loraprune" / "train_log.jsonl").is_file()
    model, _ = shearkit.load(out / "model", device="cpu")
    assert get_method("loraprune").kind == "structured" and model is not None
