"""Sparse models through recovery and back: masks declared in the plan and saved with the model,
LoRA trained, evaluated and merged under them (the zeros stay exactly), compressed-tensors
folders loaded again (issue 10, items 2 and 12)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import shearkit
from shearkit.cli import app
from shearkit.errors import ShearkitError
from shearkit.eval.perplexity import perplexity
from shearkit.io.save import save
from shearkit.io.sparse_export import load_compressed, save_compressed, sparse_targets
from shearkit.plan import Plan
from shearkit.recovery import RecoverConfig, recover

from conftest import make_tiny



@pytest.fixture
def inst_file(tmp_path):
    words = ["quick", "brown", "lazy", "small", "hello", "world", "test", "fox"]
    recs = [{"instruction": f"say {w}", "input": "", "output": f"the {w} fox"} for w in words]
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(recs))
    return p


def _cfg(data, **kw) -> RecoverConfig:
    base = dict(data=str(data), steps=3, batch_size=2, seqlen=32, lr=1e-2, warmup=0, dropout=0.0)
    return RecoverConfig(**{**base, **kw})


def _calib() -> torch.Tensor:
    return torch.randint(3, 320, (4, 16), generator=torch.Generator().manual_seed(0))


def _weights(model) -> dict[str, torch.Tensor]:
    """Every block linear weight, by module name (GPT-2's Conv1D as stored)."""
    return {t: model.get_submodule(t).weight.detach().clone() for t in sparse_targets(model)}


def _assert_same_zeros_and_trained(before: dict, after: dict) -> None:
    changed = 0
    for name, w in before.items():
        assert torch.equal(w == 0, after[name] == 0), f"{name}: the zero pattern changed"
        changed += int((w != after[name]).sum())
    assert changed > 0, "recovery changed no weight: the test would not see a dense update"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- the masked update ---------------------------------------------------------------------------


def test_masked_lora_term_and_gradients():
    """x (M ⊙ s·BA)ᵀ with its hand-written backward: values and gradients checked numerically."""
    from shearkit.recovery.masked import masked_lora

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    keep = torch.rand(5, 8, generator=g) > 0.5
    ref = x @ ((b @ a) * keep * 1.5).T
    torch.testing.assert_close(masked_lora(x, a, b, keep, 1.5), ref)
    assert torch.autograd.gradcheck(lambda x, a, b: masked_lora(x, a, b, keep, 1.5), (x, a, b))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masked_layers_train_and_evaluate_the_same_function(family):
    """The training path (masked low-rank term) and the evaluation path (merged weight) agree, and
    only layers with zeros are masked ("auto"; a dense model gets none)."""
    from peft import get_peft_model

    from shearkit.recovery.lora import lora_config
    from shearkit.recovery.masked import mask_lora_layers

    dense = get_peft_model(make_tiny(family), lora_config(make_tiny(family), 4, 8, 0.0))
    assert mask_lora_layers(dense, "auto") == {}
    model = make_tiny(family)
    shearkit.prune(model, None, "magnitude", 0.5)
    peft_model = get_peft_model(model, lora_config(model, 4, 8, 0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    applied = mask_lora_layers(peft_model, "auto")
    assert set(applied) == set(sparse_targets(model))
    ids = torch.randint(3, 320, (2, 12))
    peft_model.eval()  # no dropout anywhere; with gradients on, the layers take the training path
    with torch.enable_grad():
        trained = peft_model(input_ids=ids).logits
    torch.testing.assert_close(_logits(peft_model, ids), trained.detach(), rtol=1e-5, atol=1e-5)


# -- the Python API -----------------------------------------------------------------------------


@pytest.mark.parametrize("family,method", [("llama", "wanda"), ("gpt2", "sparsegpt"), ("qwen2", "magnitude")])
def test_api_recovery_keeps_the_plans_zeros(family, method, chat_tok, inst_file, text_file, tmp_path):
    """Recovering a pruned model with its plan keeps exactly the zeros; what recovery evaluated
    is what is returned; the saved plan and card state the sparsity the weights have."""
    model = make_tiny(family)
    plan = shearkit.prune(model, None, method, 0.5, calib=_calib())
    before = _weights(model)
    c = _cfg(inst_file, eval_every=3, eval_tasks=[str(text_file)], eval_limit=2, eval_seqlen=16)
    merged, h = recover(model, chat_tok, c, masks=plan)
    after = _weights(merged)
    _assert_same_zeros_and_trained(before, after)
    assert h["masked_layers"] == len(before)
    # the evaluation during recovery saw the model that came out of the merge
    final = perplexity(merged, chat_tok, str(text_file), seqlen=16, limit=2)["ppl"]
    assert h["eval"][3][str(text_file)] == pytest.approx(final, rel=1e-4)
    out = save(merged, chat_tok, tmp_path / "m", plan=plan)
    prov = json.loads((out / "shearkit.json").read_text())
    assert prov["sparsity_measured"] == pytest.approx(plan.ratio_achieved, abs=1e-12)
    assert f"{plan.ratio_achieved:.4f}" in (out / "README.md").read_text()
    back = Plan.load(out)
    assert back.masks_file == "sparsity/masks.safetensors" and (out / back.masks_file).is_file()
    for name, w in after.items():  # the masks saved beside the model are the weights' zeros
        w_oi = w.T if family == "gpt2" else w
        assert torch.equal(back.masks[name], w_oi != 0), name


def test_api_default_keeps_zeros_without_a_plan_and_none_opts_out(chat_tok, inst_file):
    model = make_tiny("llama")
    shearkit.prune(model, None, "wanda", 0.5, calib=_calib())
    before = _weights(model)
    dense_copy = copy.deepcopy(model)
    merged, h = recover(model, chat_tok, _cfg(inst_file))  # masks="auto": the model's own zeros
    _assert_same_zeros_and_trained(before, _weights(merged))
    assert h["masked_layers"] == len(before)
    filled, h = recover(dense_copy, chat_tok, _cfg(inst_file), masks=None)  # asked for a dense update
    assert h["masked_layers"] == 0
    assert sum(int((w == 0).sum()) for w in _weights(filled).values()) < 0.01 * sum(
        int((w == 0).sum()) for w in before.values())


def test_unmerged_result_applies_the_masks_and_saves_sparse(chat_tok, inst_file, tmp_path):
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "magnitude", 0.5)
    before = _weights(model)
    peft_model, _ = recover(model, chat_tok, _cfg(inst_file, merge=False), masks=plan)
    ids = torch.randint(3, 320, (1, 10))
    out = save(peft_model, chat_tok, tmp_path / "m", plan=plan)  # merged on a copy, masked
    loaded, _ = shearkit.load(out, device="cpu")
    _assert_same_zeros_and_trained(before, _weights(loaded))
    torch.testing.assert_close(_logits(loaded, ids), _logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_plan_masks_must_match_the_model(chat_tok, inst_file):
    model = make_tiny("llama")
    plan = shearkit.prune(copy.deepcopy(model), None, "magnitude", 0.5)
    with pytest.raises(ShearkitError, match="non-zero weights where its mask prunes"):
        recover(model, chat_tok, _cfg(inst_file), masks=plan)  # the dense base, not the pruned model


def test_save_refuses_a_plan_whose_zeros_were_lost(chat_tok, inst_file, tmp_path):
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "wanda", 0.5, calib=_calib())
    filled, _ = recover(model, chat_tok, _cfg(inst_file), masks=None)
    with pytest.raises(ShearkitError, match="non-zero weights where its plan pruned them"):
        save(filled, chat_tok, tmp_path / "m", plan=plan)
    plan.masks = None  # without masks, the count of zeros is checked
    with pytest.raises(ShearkitError, match="lost its sparsity"):
        save(filled, chat_tok, tmp_path / "m", plan=plan)
    assert not (tmp_path / "m").exists()


# -- the command line -----------------------------------------------------------------------------


def _invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, r.output
    return r


def _pruned_model_dir(tmp_path, base: Path, text: Path, *extra) -> Path:
    run = tmp_path / "pruned"
    _invoke("prune", base, "--method", "wanda", "--ratio", "0.5", "--calib", text, "--calib-samples", 4,
            "--calib-seqlen", 16, "--tasks", text, "--eval-seqlen", 16, "--limit", 2, "--no-dense-eval", "--out", run,
            *extra)
    return run / "model"


@pytest.mark.parametrize("drop_masks", [False, True])
def test_cli_recover_keeps_the_zeros(tmp_path, tiny_model_dir, chat_tok, inst_file, text_file, drop_masks):
    """`shearkit recover MODEL_DIR` on a Wanda model: same zeros, plan and card true, masks saved
    beside the model; with the masks file deleted they come from the model's zeros."""
    chat_tok.save_pretrained(tiny_model_dir)
    src = _pruned_model_dir(tmp_path, tiny_model_dir, text_file)
    has_masks = (src / "sparsity" / "masks.safetensors").is_file()
    if drop_masks:
        shutil.rmtree(src / "sparsity", ignore_errors=True)
    pruned, _ = shearkit.load(src, device="cpu")
    before = _weights(pruned)
    out = tmp_path / "rec"
    _invoke("recover", src, "--data", inst_file, "--steps", 3, "--batch-size", 2, "--seqlen", 32, "--lr", "1e-2",
            "--out", out, "--device", "cpu")
    model, _ = shearkit.load(out / "model", device="cpu")
    _assert_same_zeros_and_trained(before, _weights(model))
    assert has_masks and not (src / "masks.safetensors").exists()  # in a sub-folder engines do not read
    plan = Plan.load(out / "model")
    assert plan.method == "wanda" and plan.masks is not None
    assert {n: torch.equal(plan.masks[n], w != 0) for n, w in _weights(model).items()} == dict.fromkeys(before, True)
    prov = json.loads((out / "model" / "shearkit.json").read_text())
    assert prov["sparsity_measured"] == pytest.approx(plan.ratio_achieved, abs=1e-12)
    card = (out / "model" / "README.md").read_text()
    assert f"measured on these weights: {plan.ratio_achieved:.4f}" in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recover"]["masked_layers"] == len(before)


# -- compressed-tensors folders (item 12) -------------------------------------------------------------


@pytest.mark.parametrize("method,nm", [("wanda", None), ("magnitude", "2:4")])
def test_compressed_tensors_folder_loads_with_shearkit(tmp_path, tiny_tokenizer, method, nm):
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, method, 0.5, nm=nm, calib=_calib())
    save_compressed(model, tiny_tokenizer, tmp_path / "ct", plan=plan)
    assert not (tmp_path / "ct" / "masks.safetensors").exists()
    loaded, tok = shearkit.load(tmp_path / "ct", device="cpu")
    ids = torch.randint(3, 320, (2, 12))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert tok is not None
    back = Plan.load(tmp_path / "ct", model=loaded)  # the masks were saved with the folder
    assert set(back.masks) == set(plan.masks)
    assert all(torch.equal(back.masks[k], plan.masks[k]) for k in plan.masks)
    (tmp_path / "ct" / "sparsity" / "masks.safetensors").unlink()  # absent: the decompressed zeros
    derived = Plan.load(tmp_path / "ct", model=loaded)
    assert all(torch.equal(derived.masks[k], plan.masks[k]) for k in plan.masks)


def test_cli_eval_bench_generate_recover_on_a_compressed_tensors_folder(tmp_path, tiny_model_dir, chat_tok, inst_file,
                                                            text_file):
    chat_tok.save_pretrained(tiny_model_dir)
    src = _pruned_model_dir(tmp_path, tiny_model_dir, text_file, "--save-format", "compressed-tensors")
    assert "quantization_config" in json.loads((src / "config.json").read_text())
    r = _invoke("eval", src, "--tasks", text_file, "--seqlen", 16, "--limit", 2, "--out", tmp_path / "ev", "--json")
    assert json.loads(r.stdout)[str(text_file)]["value"] > 1
    r = _invoke("bench", src, "--length", 16, "--decode-tokens", 2, "--repeats", 1, "--warmup", 0, "--json",
                "--out", tmp_path / "bn", "--device", "cpu")
    assert json.loads(r.stdout)  # measured, not refused
    r = _invoke("generate", src, "Hello", "--max-new-tokens", 3, "--raw", "--device", "cpu")
    assert r.stdout.strip()
    pruned, _ = load_compressed(src)  # the decompressed weights, read independently of shearkit.load
    before = _weights(pruned)
    zeros = sum(int((w == 0).sum()) for w in before.values()) / sum(w.numel() for w in before.values())
    assert zeros == pytest.approx(0.5, abs=0.01)
    out = tmp_path / "rec"
    _invoke("recover", src, "--data", inst_file, "--steps", 3, "--batch-size", 2, "--seqlen", 32, "--lr", "1e-2",
            "--out", out, "--device", "cpu")
    model, _ = shearkit.load(out / "model", device="cpu")
    _assert_same_zeros_and_trained(before, _weights(model))
    assert Plan.load(out / "model").method == "wanda"
