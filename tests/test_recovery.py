"""LoRA recovery: data formatting and masking, the training loop (loss, accumulation, resume,
NaN/divergence stops, distillation), merging, per-layer widths, errors, recipe and CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import FAMILIES, make_tiny
from shearkit.errors import ShearkitError
from shearkit.recovery import RecoverConfig, recover
from shearkit.recovery.data import IGNORE, ALPACA_PROMPT_NO_INPUT, build_train_data, collate
from shearkit.recovery.trainer import DivergenceGuard

WORDS = ["quick", "brown", "lazy", "small", "hello", "world", "test", "fox"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with other jobs on the CPU, more threads spin and
    slow each step down by an order of magnitude."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def inst_file(tmp_path):
    recs = [{"instruction": f"say {w}", "input": "now" if i % 2 else "", "output": f"the {w} fox"}
            for i, w in enumerate(WORDS)]
    p = tmp_path / "inst.json"
    p.write_text(json.dumps(recs))
    return p


def cfg(data, **kw) -> RecoverConfig:
    base = dict(data=str(data), steps=4, batch_size=2, seqlen=32, lr=5e-3, warmup=0, dropout=0.0)
    return RecoverConfig(**{**base, **kw})


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# -- data ---------------------------------------------------------------------------------------

def test_chat_masking_labels_only_the_response(chat_tok, inst_file):
    data = build_train_data(chat_tok, str(inst_file), seqlen=64)
    assert data.mode == "instruction" and data.record["template"] == "chat"
    for ids, lab, w in zip(data.input_ids, data.labels, WORDS):
        n_prompt = sum(t == IGNORE for t in lab)
        assert all(t == IGNORE for t in lab[:n_prompt])  # prompt first, then the response
        assert lab[n_prompt:] == ids[n_prompt:]
        prompt = chat_tok.decode(ids[:n_prompt])
        assert prompt.endswith("<s>a:") and f"say {w}" in prompt
        assert chat_tok.decode(lab[n_prompt:]) == f"the {w} fox</s>"


def test_alpaca_template_without_chat_template(tiny_tokenizer, inst_file):
    assert not getattr(tiny_tokenizer, "chat_template", None)
    data = build_train_data(tiny_tokenizer, str(inst_file), seqlen=256)
    assert data.record["template"] == "alpaca"
    ids, lab = data.input_ids[0], data.labels[0]  # record 0 has no input
    n_prompt = sum(t == IGNORE for t in lab)
    assert tiny_tokenizer.decode(ids[:n_prompt]) == ALPACA_PROMPT_NO_INPUT.format(instruction="say quick")
    assert lab[n_prompt:-1] == tiny_tokenizer("the quick fox", add_special_tokens=False)["input_ids"]
    assert lab[-1] == tiny_tokenizer.eos_token_id
    assert "### Input:\nnow" in tiny_tokenizer.decode(data.input_ids[1])


def test_too_long_prompts_are_skipped_and_padding_is_masked(chat_tok, tmp_path):
    recs = [{"instruction": "x " * 200, "output": "y"}, {"instruction": "hi", "output": "the fox"},
            {"instruction": "hello", "output": "the quick brown fox jumps"}]
    p = tmp_path / "i.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    data = build_train_data(chat_tok, str(p), seqlen=40)
    assert data.record["skipped_too_long"] == 1 and len(data) == 2
    b = collate(data, [0, 1], pad=2)
    short = int(b["attention_mask"][0].sum())
    assert short < b["input_ids"].shape[1]
    assert (b["labels"][0, short:] == IGNORE).all() and (b["attention_mask"][0, short:] == 0).all()


def test_text_mode_packs_windows(tiny_tokenizer, text_file):
    data = build_train_data(tiny_tokenizer, str(text_file), seqlen=16)
    assert data.mode == "text"
    assert all(len(x) == 16 for x in data.input_ids)
    assert data.labels == data.input_ids  # every token is trained on


# -- training -----------------------------------------------------------------------------------

def test_loss_decreases_on_tiny_overfit_set(tiny_tokenizer, text_file, tmp_path):
    model = make_tiny("llama")
    with torch.no_grad():  # a random tiny head caps logits near +-1; scale it so the text can be memorised
        model.lm_head.weight.mul_(10)
    _, h = recover(model, tiny_tokenizer, cfg(text_file, steps=20, lr=1e-2), out_dir=tmp_path)
    assert h["stopped"] is None and h["steps_done"] == 20
    assert sum(h["losses"][-3:]) / 3 < 0.3 * h["losses"][0]
    log = [json.loads(l) for l in (tmp_path / "recovery" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert log[-1]["tokens_seen"] == 20 * 2 * 32 == h["budget"]["tokens"]
    assert (tmp_path / "recovery" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_periodic_perplexity_eval_is_logged(chat_tok, inst_file, text_file, tmp_path):
    c = cfg(inst_file, steps=4, eval_every=2, eval_tasks=[str(text_file)], eval_limit=2, eval_seqlen=16)
    _, h = recover(make_tiny("llama"), chat_tok, c, out_dir=tmp_path)
    assert sorted(h["eval"]) == [0, 2, 4]
    assert all(1.0 < v[str(text_file)] < 1e4 for v in h["eval"].values())
    log = [json.loads(l) for l in (tmp_path / "recovery" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval_ppl" in r] == [0, 2, 4]
    assert "loss" not in log[0]  # the step-0 record is the baseline evaluation only


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged(family, chat_tok, inst_file):
    """Merging the adapters (peft merge_and_unload) changes no logit beyond 1e-5 in float32."""
    model = make_tiny(family)
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        base = model(ids).logits
    peft_model, h = recover(model, chat_tok, cfg(inst_file, steps=3, merge=False))
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        assert (unmerged - base).abs().max() > 1e-3  # the adapters did change the model
        merged = peft_model.merge_and_unload()
        assert not any("lora" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(merged(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_merge_on_return_gives_plain_model(chat_tok, inst_file):
    model = make_tiny("gpt2")
    out, h = recover(model, chat_tok, cfg(inst_file, steps=2))
    assert h["merged"] and type(out).__name__ == "GPT2LMHeadModel"
    assert not any("lora" in n for n, _ in out.named_modules())
    assert all(p.requires_grad for p in out.parameters())  # flags as they were before recovery
    assert not out.training


def test_grad_accumulation_equals_larger_batch(chat_tok, inst_file):
    a, _ = recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=3, batch_size=2, grad_accum=1, merge=False))
    b, _ = recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=3, batch_size=1, grad_accum=2, merge=False))
    wa, wb = adapters(a), adapters(b)
    assert wa.keys() == wb.keys()
    for n in wa:
        # float32 sums in another order; Adam's normalisation amplifies that on tiny gradients,
        # so 1e-5 (updates here are ~1e-2)
        torch.testing.assert_close(wa[n], wb[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("lean", [{"gradient_checkpointing": True},
                                  {"gradient_checkpointing": True, "loss_chunk": 5}], ids=["checkpointing", "both"])
def test_gradient_checkpointing_gives_the_same_training(chat_tok, inst_file, lean):
    """The memory settings (issue 16 item 3) follow the same loss curve to the same adapters."""
    a, ha = recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=2, merge=False, loss_chunk=0))
    b, hb = recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=2, merge=False, **lean))
    assert ha["losses"] == pytest.approx(hb["losses"], abs=1e-6)
    wa, wb = adapters(a), adapters(b)
    for n in wa:
        # the chunked head sums the loss in another order; Adam's normalisation amplifies that on tiny
        # gradients (one element in 512 was off by 2.6e-6 once), so the tolerance of the test above
        torch.testing.assert_close(wa[n], wb[n], atol=1e-5, rtol=1e-4)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in b.modules())


def test_resume_after_interruption_matches_uninterrupted(chat_tok, inst_file, tmp_path):
    c = cfg(inst_file, steps=6, save_every=2, grad_accum=2, dropout=0.1, merge=False)  # dropout: RNG must resume
    full, _ = recover(make_tiny("llama"), chat_tok, c, out_dir=tmp_path / "a")

    class Crash(Exception):
        pass

    def crash(step, record):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        recover(make_tiny("llama"), chat_tok, c, out_dir=tmp_path / "b", on_step=crash)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "recovery").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert {p.name for p in (tmp_path / "b" / "recovery" / "checkpoint-4").iterdir()} == {
        "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"}
    resumed, h = recover(make_tiny("llama"), chat_tok, c, out_dir=tmp_path / "b", resume=True)
    assert h["resumed_from"] == 4 and h["steps_done"] == 6
    wa, wb = adapters(full), adapters(resumed)
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "recovery" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_changed_settings(chat_tok, inst_file, tmp_path):
    recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=2, save_every=1), out_dir=tmp_path)
    with pytest.raises(ShearkitError, match="already holds checkpoints"):
        recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=2), out_dir=tmp_path)
    with pytest.raises(ShearkitError, match="recover.rank"):
        recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=2, save_every=1, rank=4), out_dir=tmp_path,
                resume=True)
    with pytest.raises(ShearkitError, match="other base weights"):
        recover(make_tiny("llama", seed=1), chat_tok, cfg(inst_file, steps=2, save_every=1), out_dir=tmp_path,
                resume=True)


def test_nan_stops_and_restores_last_good_state(chat_tok, inst_file):
    model = make_tiny("llama")  # peft injects the adapters into this very object
    seen: dict[int, dict] = {}

    def poison(step, record):
        seen[step] = adapters(model)
        if step == 2:  # corrupt the adapters: step 3's loss is NaN
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    out, h = recover(model, chat_tok, cfg(inst_file, steps=6, merge=False), on_step=poison)
    assert h["stopped"] == "nan" and h["stopped_at"] == 3 and h["restored_to_step"] == 1
    assert h["steps_done"] == 2 and len(h["losses"]) == 2
    assert out.base_model.model is model
    restored = adapters(model)
    for n, w in seen[1].items():  # the adapters whose loss (step 2) was last seen finite
        assert torch.equal(restored[n], w), n
    assert all(torch.isfinite(w).all() for w in restored.values())


def test_divergence_guard_waits_for_patience():
    g = DivergenceGuard(factor=3.0, patience=2)
    assert [g.check(x) for x in (2.0, 1.8, 1.6)] == ["ok"] * 3
    assert g.check(10.0) == "suspect"  # one spike is tolerated
    assert g.check(1.7) == "ok"
    assert g.check(10.0) == "suspect"
    assert g.check(12.0) == "diverged"
    assert DivergenceGuard(3.0, 1).check(float("inf")) == "nan"
    assert DivergenceGuard(0.0, 1).check(1e9) == "ok"  # 0 disables the check


def test_huge_lr_divergence_stops_and_restores(chat_tok, inst_file):
    """lr 10 sends the loss above 1.2 x its best at once; the adapters go back to the last good
    state, here the initial one (lora_B = 0, i.e. the unchanged model)."""
    model = make_tiny("llama")
    with torch.no_grad():  # lets the loss grow far above its start (a tiny random head caps it)
        model.lm_head.weight.mul_(10)
    out, h = recover(model, chat_tok, cfg(inst_file, steps=6, lr=10.0, max_grad_norm=0, merge=False,
                                          divergence=1.2, divergence_patience=1))
    assert h["stopped"] == "diverged" and h["stopped_at"] == 2 and h["restored_to_step"] == 0
    assert h["stop_loss"] > 1.2 * h["losses"][0]
    lora_b = [w for n, w in adapters(model).items() if "lora_B" in n]
    assert lora_b and all((w == 0).all() for w in lora_b)


def test_distillation_from_identical_teacher_has_zero_kd(chat_tok, inst_file):
    """With the student as its own teacher and weight 1, the first step's loss is KL(p||p) = 0."""
    model = make_tiny("llama")
    teacher = copy.deepcopy(model)
    _, h = recover(model, chat_tok, cfg(inst_file, steps=1, distill_weight=1.0), teacher=teacher)
    assert abs(h["losses"][0]) < 1e-5
    _, h2 = recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=1, distill_weight=0.0), teacher=teacher)
    assert h2["losses"][0] > 1.0  # plain cross-entropy of a random model


def test_layers_of_different_widths(chat_tok, inst_file):
    """A pruned model whose layers have their own MLP widths gets adapters of matching shapes."""
    model = make_tiny("llama")
    mlp = model.model.layers[0].mlp
    keep = torch.arange(0, 96, 2)  # layer 0 keeps 48 of 96 channels
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(64, 48, bias=False)
            new.weight.copy_(old.weight[keep])
            setattr(mlp, name, new)
        new = torch.nn.Linear(48, 64, bias=False)
        new.weight.copy_(mlp.down_proj.weight[:, keep])
        mlp.down_proj = new
    peft_model, h = recover(model, chat_tok, cfg(inst_file, steps=2, merge=False))
    layers = peft_model.base_model.model.model.layers
    assert layers[0].mlp.gate_proj.lora_B["default"].weight.shape == (48, 8)
    assert layers[0].mlp.down_proj.lora_A["default"].weight.shape == (8, 48)
    assert layers[1].mlp.gate_proj.lora_B["default"].weight.shape == (96, 8)
    merged = peft_model.merge_and_unload()
    assert merged.model.layers[0].mlp.gate_proj.weight.shape == (48, 64)
    assert torch.isfinite(merged(torch.randint(3, 320, (1, 8))).logits).all()


def test_default_targets_cover_every_block_projection(chat_tok, inst_file):
    from shearkit.recovery.lora import default_targets

    assert default_targets(make_tiny("llama")) == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
                                                   "self_attn.v_proj"]
    assert default_targets(make_tiny("gpt2")) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    peft_model, _ = recover(make_tiny("gpt2"), chat_tok, cfg(inst_file, steps=1, merge=False))
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "lora_A" not in n}
    assert len(wrapped) == 3 * 4  # 3 layers x 4 projections
    assert peft_model.peft_config["default"].fan_in_fan_out  # Conv1D


def test_save_adapter_writes_peft_files(chat_tok, inst_file, tmp_path):
    recover(make_tiny("llama"), chat_tok, cfg(inst_file, steps=1, save_adapter=True), out_dir=tmp_path)
    files = {p.name for p in (tmp_path / "recovery" / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files


# -- errors, recipe, CLI --------------------------------------------------------------------------

def test_bad_input_gives_clear_errors(chat_tok, inst_file, tmp_path):
    model = make_tiny("llama")
    with pytest.raises(ShearkitError, match="Unknown data set 'alpacca'.*Did you mean 'alpaca'"):
        recover(model, chat_tok, {"data": "alpacca", "steps": 1})
    with pytest.raises(ShearkitError, match="recover.steps must be at least 1"):
        RecoverConfig(steps=0)
    with pytest.raises(ShearkitError, match="target module 'q_prj' was not found.*Did you mean 'q_proj'"):
        recover(model, chat_tok, cfg(inst_file, target_modules=["q_prj"]))
    with pytest.raises(ShearkitError, match="schedule must be one of"):
        RecoverConfig(schedule="cosin")
    with pytest.raises(ShearkitError, match="needs a dense teacher"):
        recover(model, chat_tok, cfg(inst_file, distill_weight=0.5))
    with pytest.raises(ShearkitError, match="resume=True needs out_dir"):
        recover(model, chat_tok, cfg(inst_file), resume=True)
    with pytest.raises(ShearkitError, match="leak the evaluation set"):
        recover(model, chat_tok, {"data": "wikitext2", "split": "test", "steps": 1})
    with pytest.raises(ShearkitError, match="not found"):
        recover(model, chat_tok, {"data": str(tmp_path / "missing.json"), "steps": 1})
    assert not any("lora" in n for n, _ in model.named_modules())  # nothing was injected


def test_recipe_section(tmp_path):
    from shearkit.recipe import parse_recipe

    r = parse_recipe({"recover": {"steps": 10, "lr": "1e-3", "target_modules": "q_proj,v_proj"}})
    rc = r.get("recover")
    assert isinstance(rc, RecoverConfig) and rc.steps == 10 and rc.lr == 1e-3
    assert rc.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ShearkitError, match="Did you mean 'grad_accum'"):
        parse_recipe({"recover": {"grad_acum": 2}})


def test_cli_recover_writes_run_directory(chat_tok, inst_file, tmp_path):
    from typer.testing import CliRunner

    from shearkit.cli import app

    src = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(src)
    chat_tok.save_pretrained(src)
    run = tmp_path / "run"
    args = ["recover", str(src), "--data", str(inst_file), "--steps", "2", "--batch-size", "2", "--seqlen", "32",
            "--save-every", "1", "--out", str(run), "--device", "cpu", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["recover"]["steps_done"] == 2 and metrics["recover"]["budget"]["tokens"] > 0
    for f in ("recipe.yaml", "env.json", "run.log", "recovery/train_log.jsonl", "recovery/loss.png",
              "recovery/checkpoint-2/adapter.safetensors", "model/config.json"):
        assert (run / f).is_file(), f
    # files named relative to the run directory (it can move), and the seed the recipe used
    assert (metrics["recover"]["log"], metrics["recover"]["plot"]) == ("recovery/train_log.jsonl", "recovery/loss.png")
    env = json.loads((run / "env.json").read_text())
    assert (env["seed"], env["seeds"]) == (0, {"recover.seed": 0})
    import shearkit

    m, _ = shearkit.load(str(run / "model"), device="cpu")
    assert not any("lora" in n for n, _ in m.named_modules())
    # resuming a finished run trains nothing more, keeps the run directory and saves the model again
    res = CliRunner().invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    again = json.loads((run / "metrics.json").read_text())["recover"]
    assert again["resumed_from"] == 2 and again["steps_done"] == 2
    assert (run / "model" / "config.json").is_file() and (run / "recovery" / "checkpoint-1").is_dir()


@pytest.mark.slow
def test_smollm_recovery_on_alpaca(smollm, data_dir):
    """Two steps on the real model: its own chat template formats Alpaca, the loss is a sane
    instruction-tuning loss, and the merged model still scores a sane perplexity."""
    from shearkit.eval.perplexity import perplexity

    model, tok = smollm
    model = copy.deepcopy(model)
    data = build_train_data(tok, "alpaca", seqlen=128, data_dir=data_dir)
    assert data.record["template"] == "chat" and data.record["examples"] > 900
    whole = next(lab for ids, lab in zip(data.input_ids, data.labels) if len(ids) < 128)  # not truncated
    reply = tok.decode([t for t in whole if t != IGNORE])
    assert reply.endswith("<|im_end|>\n") and "<|im_start|>" not in reply
    out, h = recover(model, tok, RecoverConfig(data="alpaca", steps=2, batch_size=2, seqlen=128, lr=1e-4),
                     data_dir=data_dir)
    assert h["stopped"] is None and 0.2 < h["losses"][0] < 5.0
    assert h["masked_layers"] == 0  # a dense model has (next to) no zeros: plain LoRA
    ppl = perplexity(out, tok, "wikitext2", seqlen=256, limit=2, data_dir=data_dir)["ppl"]
    assert 10 < ppl < 60


DDP_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from conftest import FAMILIES, make_tiny
from transformers import AutoTokenizer
from shearkit.recovery import recover, RecoverConfig
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained({tok!r})
cfg = RecoverConfig(data={data!r}, steps=3, batch_size=int(sys.argv[1]), seqlen=32, lr=5e-3, warmup=0, dropout=0.0)
model = make_tiny("llama")
if {sparse!r}:  # masked LoRA layers under DDP
    import shearkit
    shearkit.prune(model, None, "magnitude", 0.5)
zeros = {{n: p == 0 for n, p in model.state_dict().items()}}
out, h = recover(model, tok, cfg)
assert all(torch.equal(out.state_dict()[n] == 0, z) for n, z in zeros.items()), "zeros changed"
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({{"w": {{n: p.detach() for n, p in out.state_dict().items()}}, "h": [h["processes"], h["losses"],
                h["masked_layers"]]}}, sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
def test_two_processes_match_one(chat_tok, inst_file, tmp_path, sparse):
    """`torchrun --nproc_per_node 2` (accelerate's DDP on CPU, gloo) with 2 sequences per process
    gives the same losses and weights as one process with 4 sequences (a sparse model: with the
    same zeros)."""
    import pathlib
    import subprocess
    import sys

    chat_tok.save_pretrained(tmp_path / "tok")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), tok=str(tmp_path / "tok"),
                                        data=str(inst_file), sparse=sparse))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    subprocess.run([sys.executable, str(script), "4", str(tmp_path / "one.pt")], check=True, env=env)
    subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), "2", str(tmp_path / "two.pt")], check=True,
                   env=env, timeout=300)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["h"][0] == 1 and two["h"][0] == 2
    assert (one["h"][2] > 0) == sparse and two["h"][2] == one["h"][2]
    torch.testing.assert_close(torch.tensor(two["h"][1]), torch.tensor(one["h"][1]), atol=1e-5, rtol=0)
    for n, w in one["w"].items():
        torch.testing.assert_close(two["w"][n], w, atol=1e-5, rtol=1e-4)
