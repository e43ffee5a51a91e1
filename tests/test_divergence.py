"""Divergence and reproducibility of every training loop (issue 15 item 3).

A NaN loss (or a spike) is injected from a chosen step of one named trainer (`nan_from`); each loop must stop
there with a message naming the step and what to change, keep the trainable weights of the last
good step (compared tensor by tensor), never write NaN into a checkpoint or the returned / saved
model, and end as a user expects: recovery, FlexiGPT, extension and LoRAShear's dynamic recovery
keep their last good weights and record the stop; LoRAPrune before its target and LHSPG (which
writes into the base weights) refuse to produce a model. Then: the same seed gives bit-identical
weights for a whole run of each training method, whatever the global RNG held before it.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import shearkit
from shearkit.errors import ShearkitError
from shearkit.recovery import RecoverConfig, recover
from shearkit.recovery.loop import Trainer

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
FIX = "Rerun with a lower learning rate (lr, now"
LORAPRUNE = {"steps": 8, "data": "ptb", "split": "validation", "seqlen": 16, "batch_size": 2, "save_every": 2}
LORASHEAR = {"gamma": 0.0, "periods": 1, "warmup": 0.34, "dynamic": {"phases": [["wiki"]], "round_steps": 4,
             "heldout_windows": 2, "heldout_seqlen": 16}, "train": {"steps": 3, "seqlen": 32, "batch_size": 2},
             "recovery": {"steps": 3, "seqlen": 32, "batch_size": 2}}


@pytest.fixture
def nan_from(monkeypatch):
    """`nan_from(desc, k)`: the trainer described `desc` sees a NaN loss (or `loss`) at every step from
    `k` on. Returns what it saw: the trainer, and its trainable weights at the start of each step."""
    real = Trainer._forward_backward

    def arm(desc: str, k: int, loss: float = math.nan) -> dict:
        seen: dict = {"trainer": None, "before": {}}

        def forward_backward(self, step, pad, label_counts):
            out = real(self, step, pad, label_counts)
            if self.desc != desc:
                return out
            seen["trainer"] = self
            seen["before"][step + 1] = {n: p.detach().clone() for n, p in self.named_params.items()}
            return (loss, *out[1:]) if step + 1 >= k else out

        monkeypatch.setattr(Trainer, "_forward_backward", forward_backward)
        return seen
    return arm


def assert_kept(seen: dict, history: dict, k: int) -> None:
    """Stopped at step k with the message; the trainable weights are those after step k - 2 (the
    last whose loss, measured at step k - 1, was finite), i.e. those at the start of step k - 1."""
    assert (history["stopped"], history["stopped_at"], history["restored_to_step"]) == ("nan", k, k - 2)
    assert f"at step {k} of " in history["stop_message"] and FIX in history["stop_message"]
    want = seen["before"][k - 1]
    for n, p in seen["trainer"].named_params.items():
        assert torch.equal(p.detach(), want[n]), n


def assert_finite(model) -> None:
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, bad


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff


# -- recovery ------------------------------------------------------------------------------------

def test_recover_command_keeps_the_last_good_adapters_and_saves_a_finite_model(tiny_model_dir, text_file,
                                                                               tmp_path, nan_from):
    from typer.testing import CliRunner

    from shearkit.cli import app

    seen = nan_from("recover", 4)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["recover", str(tiny_model_dir), "--data", str(text_file), "--steps", "5",
                                   "--batch-size", "2", "--seqlen", "16", "--save-every", "1", "--out", str(run),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "recover: a non-finite loss" in res.output and "at step 4 of 5" in res.output and FIX in res.output
    h = json.loads((run / "metrics.json").read_text())["recover"]
    assert_kept(seen, h, 4)
    assert "at step 4 of 5" in (run / "run.log").read_text()  # the stop is in the run's log
    # the checkpoint of the kept step is there, unchanged; none was written at or after the stop
    rec = run / "recovery"
    assert sorted(p.name for p in rec.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    kept = {n.replace(".default", ""): w for n, w in seen["before"][3].items()}  # peft's saved names
    ckpt = load_file(str(rec / "checkpoint-2" / "adapter.safetensors"))
    assert ckpt.keys() == kept.keys() and all(torch.equal(ckpt[k], kept[k]) for k in ckpt)
    assert json.loads((run / ".shearkit-run").read_text())["status"] == "complete"
    model, _ = shearkit.load(str(run / "model"), device="cpu")
    assert_finite(model)


@pytest.mark.parametrize("steps, poison, save_every", [(4, 2, 1), (2, 2, 0)], ids=["checkpoint", "last-step"])
def test_non_finite_weights_never_reach_a_checkpoint_or_the_model(tiny_tokenizer, text_file, tmp_path,
                                                                    steps, poison, save_every):
    """An update that leaves NaN weights (here a callback writes them) stops training before they are
    checkpointed, or, at the last step, before they are merged and returned."""
    model = make_tiny("llama")
    seen: dict[int, dict] = {}

    def on_step(step, record):
        weights = {n: p for n, p in model.named_parameters() if "lora_" in n}
        seen[step] = {n: p.detach().clone() for n, p in weights.items()}
        if step == poison:
            with torch.no_grad():
                next(p for n, p in weights.items() if "lora_B" in n).fill_(float("nan"))

    cfg = RecoverConfig(data=str(text_file), steps=steps, batch_size=2, seqlen=16, save_every=save_every,
                        merge=False)
    out, h = recover(model, tiny_tokenizer, cfg, out_dir=tmp_path, on_step=on_step)
    assert (h["stopped"], h["stopped_at"], h["restored_to_step"]) == ("nan", poison, poison - 1)
    assert f"non-finite trainable weights after the update at step {poison} of {steps}" in h["stop_message"]
    assert_same({n: p.detach() for n, p in model.named_parameters() if "lora_" in n}, seen[poison - 1])
    assert_finite(out.merge_and_unload())
    ckpts = sorted((tmp_path / "recovery").glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ([f"checkpoint-{s}" for s in range(1, poison)] if save_every else [])
    for p in ckpts:
        assert all(torch.isfinite(t).all() for t in load_file(str(p / "adapter.safetensors")).values())


def test_a_divergence_stop_says_which_settings_to_change(tiny_tokenizer, text_file, nan_from):
    """A loss far above the best smoothed one at steps 3 and 4 (patience 2): the stop at step 4 keeps
    the weights of step 1 (step 3's update, made while only suspect, is undone too), and the message
    names the step and the settings that matter."""
    seen = nan_from("recover", 3, loss=1e6)
    model = make_tiny("llama")
    cfg = RecoverConfig(data=str(text_file), steps=5, batch_size=2, seqlen=16, merge=False)
    _, h = recover(model, tiny_tokenizer, cfg)
    assert (h["stopped"], h["stopped_at"], h["restored_to_step"]) == ("diverged", 4, 1)
    msg = h["stop_message"]
    assert msg.startswith("recover: divergence (loss 1e+06, above 3 x the best smoothed loss") and \
        "for 2 step(s)) at step 4 of 5" in msg and "weights of step 1." in msg
    assert "lr, now 0.0002" in msg and "(max_grad_norm, now 1)" in msg and "larger divergence (now 3)" in msg
    assert_same({n: p.detach() for n, p in seen["trainer"].named_params.items()}, seen["before"][2])


# -- LoRAPrune -------------------------------------------------------------------------------------

def test_loraprune_stop_before_its_target_is_an_error_and_leaves_the_model_as_given(tiny_tokenizer, data_dir,
                                                                                     tmp_path, nan_from):
    seen = nan_from("loraprune", 4)
    model = make_tiny("llama")
    given = state(model)
    with pytest.raises(ShearkitError, match=r"LoRAPrune could not finish\. loraprune: a non-finite loss.*at step "
                                            r"4 of 8.*Rerun with a lower learning rate.*no model is produced.*"
                                            r"prune\.train"):
        shearkit.prune(model, tiny_tokenizer, "loraprune", 0.3, data_dir=data_dir, run_dir=tmp_path,
                       train=dict(LORAPRUNE), prune_every=2)
    assert_kept(seen, seen["trainer"].history, 4)
    assert_same(state(model), given)  # no adapters, no masks, no pruned weights left in it
    assert sorted(p.name for p in (tmp_path / "loraprune").glob("checkpoint-*")) == ["checkpoint-2"]


def test_loraprune_stop_after_its_target_keeps_the_pruned_model_and_records_it(tiny_tokenizer, data_dir,
                                                                                nan_from):
    """cooldown 0.25 of 8 steps: the target is pruned at step 6; a NaN at step 8 stops the training after it."""
    seen = nan_from("loraprune", 8)
    model = make_tiny("llama")
    plan = shearkit.prune(model, tiny_tokenizer, "loraprune", 0.3, data_dir=data_dir, train=dict(LORAPRUNE),
                          prune_every=2, cooldown=0.25)
    assert plan.ratio_achieved >= 0.3 and plan.extra["schedule"][-1]["step"] == 6
    assert_kept(seen, seen["trainer"].history, 8)
    assert plan.extra["train"]["stopped_at"] == 8 and FIX in plan.extra["train"]["stop_message"]
    assert_finite(model)


# -- LoRAShear (LHSPG, dynamic recovery) -----------------------------------------------------------

def test_lhspg_stop_is_an_error(tiny_tokenizer, data_dir, nan_from):
    seen = nan_from("lhspg", 3)
    with pytest.raises(ShearkitError, match=r"LoRAShear could not finish LHSPG\. lhspg: a non-finite loss.*"
                                            r"at step 3 of 3.*no model is produced.*prune\.train"):
        shearkit.prune(make_tiny("llama"), tiny_tokenizer, "lorashear", 0.25, data_dir=data_dir,
                       **copy.deepcopy(LORASHEAR))
    assert_kept(seen, seen["trainer"].history, 3)


def test_dynamic_recovery_stop_keeps_the_last_good_adapters_and_records_it(tiny_tokenizer, data_dir, nan_from):
    seen = nan_from("dynamic recovery", 3)
    model = make_tiny("llama")
    plan = shearkit.prune(model, tiny_tokenizer, "lorashear", 0.25, data_dir=data_dir, **copy.deepcopy(LORASHEAR))
    assert_kept(seen, seen["trainer"].history, 3)
    assert plan.extra["recovery"]["train"]["stopped_at"] == 3
    assert plan.extra["lhspg"]["train"]["stopped"] is None and plan.ratio_achieved >= 0.25
    assert_finite(model)


# -- FlexiGPT and extension -----------------------------------------------------------------------

@pytest.mark.parametrize("loop", ["flexigpt", "extend"])
def test_shared_block_training_stop_keeps_the_last_good_adapters_and_records_it(loop, tiny_tokenizer, text_file,
                                                                               tmp_path, nan_from):
    seen = nan_from(loop, 3)
    model = make_tiny("llama")
    train = {"steps": 4, "data": str(text_file), "seqlen": 16, "batch_size": 2, "lr": 1e-2, "save_every": 1}
    if loop == "flexigpt":
        record = shearkit.prune(model, tiny_tokenizer, "flexigpt", calib=CALIB, blocks=1, rank=4, train=train,
                                run_dir=tmp_path).extra["train"]
    else:
        record = shearkit.extend(model, tiny_tokenizer, add_blocks=1, start=1, end=1, rank=4, train=train,
                                 run_dir=tmp_path)["train"]
    assert_kept(seen, seen["trainer"].history, 3)
    assert (record["stopped"], record["stopped_at"], record["restored_to_step"]) == ("nan", 3, 1)
    assert f"{loop}: a non-finite loss" in record["stop_message"]
    assert sorted(p.name for p in (tmp_path / loop).glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert_finite(model)


# -- reproducibility -------------------------------------------------------------------------------

def _run(method: str, tok, data_dir, text_file, scramble: int):
    """One whole run of `method` on a fresh tiny model, the global RNG first set from `scramble`;
    returns its final weights."""
    model = make_tiny("llama")
    torch.manual_seed(scramble)
    text = {"data": str(text_file), "seqlen": 16, "batch_size": 2}
    if method == "recover":
        model, _ = recover(model, tok, RecoverConfig(steps=3, lr=1e-2, **text))
    elif method == "loraprune":
        shearkit.prune(model, tok, "loraprune", 0.3, data_dir=data_dir, train={**LORAPRUNE, "steps": 4},
                       prune_every=2)
    elif method == "lorashear":
        shearkit.prune(model, tok, "lorashear", 0.25, data_dir=data_dir, **copy.deepcopy(LORASHEAR))
    elif method == "flexigpt":  # `init: lora` draws its adapters at random
        shearkit.prune(model, tok, "flexigpt", calib=CALIB, blocks=1, rank=4, init="lora",
                       train={"steps": 3, "lr": 1e-2, **text})
    else:
        shearkit.extend(model, tok, add_blocks=1, start=1, end=1, rank=4, train={"steps": 3, "lr": 1e-2, **text})
    return state(model)


@pytest.mark.parametrize("method", ["recover", "loraprune", "lorashear", "flexigpt", "extend"])
def test_the_same_seed_gives_bit_identical_weights(method, tiny_tokenizer, text_file, request):
    """Two runs with the same (default) seed end with the same weights, bit for bit, even when the
    global RNG was left in another state before each (as other work in the process would)."""
    data_dir = request.getfixturevalue("data_dir") if method in ("loraprune", "lorashear") else None
    assert_same(*(_run(method, tiny_tokenizer, data_dir, text_file, scramble) for scramble in (1, 2)))
