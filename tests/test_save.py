"""Save and reload: vanilla transformers for uniform widths, shearkit / remote code for per-layer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shearkit as sk
from shearkit.errors import ShearkitError
from shearkit.io.modeling import is_shearkit_model, load_shearkit_model
from shearkit.io.save import save

from conftest import make_tiny

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def _pruned(family, allocation):
    model = make_tiny(family)
    plan = sk.prune(model, None, "structured-magnitude", 0.3, allocation=allocation)
    return model, plan


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_uniform_widths_load_with_the_plain_transformers_class(tmp_path, family):
    import transformers

    model, plan = _pruned(family, "uniform")
    assert plan.extra["uniform_widths"] and plan.extra["export"] == "vanilla"
    out = save(model, None, tmp_path / "m", plan=plan)
    cfg = json.loads((out / "config.json").read_text())
    assert "shearkit_layer_shapes" not in cfg and "auto_map" not in cfg
    assert cfg["intermediate_size"] == model.config.intermediate_size < 96
    assert not (out / "modeling_shearkit.py").exists()
    cls = getattr(transformers, cfg["architectures"][0])  # the family's own class, no remote code
    assert cls.__module__.startswith("transformers.models.")
    torch.testing.assert_close(cls.from_pretrained(out)(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.slow  # starts a fresh interpreter (torch + transformers import)
def test_uniform_widths_load_in_vanilla_transformers(tmp_path, tiny_tokenizer):
    """A subprocess that never imports shearkit loads the model and gets the same logits."""
    model, plan = _pruned("llama", "uniform")
    out = save(model, tiny_tokenizer, tmp_path / "m", plan=plan)
    torch.save(IDS, tmp_path / "ids.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
            f"m = AutoModelForCausalLM.from_pretrained(r'{out}'); AutoTokenizer.from_pretrained(r'{out}');"
            f"torch.save(m(torch.load(r'{tmp_path / 'ids.pt'}')).logits, r'{tmp_path / 'logits.pt'}');"
            "assert 'shearkit' not in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_layer_widths_load_with_shearkit_and_remote_code(tmp_path, tiny_tokenizer, family):
    from transformers import AutoModelForCausalLM

    model, plan = _pruned(family, "global")
    out = save(model, tiny_tokenizer, tmp_path / "m", plan=plan)
    assert is_shearkit_model(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_shearkit.ShearkitForCausalLM"
    assert (out / "modeling_shearkit.py").exists()
    ref = model(IDS).logits
    loaded, tok = sk.load(out, device="cpu")
    torch.testing.assert_close(loaded(IDS).logits, ref, rtol=0, atol=0)
    assert tok("the quick fox")["input_ids"] == tiny_tokenizer("the quick fox")["input_ids"]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(remote(IDS).logits, ref, rtol=0, atol=0)
    # a reloaded per-layer model saves and reloads again
    again = save(loaded, tok, tmp_path / "again")
    torch.testing.assert_close(load_shearkit_model(again)(IDS).logits, ref, rtol=0, atol=0)


def test_saved_directory_contents(tmp_path, tiny_tokenizer):
    model, plan = _pruned("qwen2", "uniform")
    out = save(model, tiny_tokenizer, tmp_path / "m", plan=plan, metrics={"wikitext2": {"ppl": 41.5, "seqlen": 512}})
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "plan.json", "shearkit.json",
            "metrics.json", "README.md", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    card = (out / "README.md").read_text()
    assert "structured-magnitude" in card and f"{plan.ratio_achieved:.4f}" in card and "41.5" in card
    prov = json.loads((out / "shearkit.json").read_text())
    assert prov["export"] == "vanilla" and prov["base"]["fingerprint"] == plan.base["fingerprint"]
    assert sk.Plan.load(out).layers == plan.layers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def _card_table(card: str) -> list[list[str]]:
    lines = card.split("## Measured", 1)[1].strip().splitlines()
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("|")]


def test_model_card_measured_table_of_a_pipeline_run():
    """The pipeline passes its whole metrics.json: the card shows each task's value dense, pruned
    before recovery and for this model, never a row per top-level key with `None`."""
    from shearkit.io.save import model_card

    ppl = lambda v: {"metric": "ppl_concat", "value": v, "ppl": v, "seqlen": 512, "limit": 8}  # noqa: E731
    zs = {"metric": "acc_norm", "value": 0.6, "metrics": {"acc": 0.61, "acc_norm": 0.6}}
    metrics = {"model": "smollm2-135m", "dense": {"tasks": {"wikitext2": ppl(20.5)}, "params": {"unique": 10}},
               "prune": {"method": "llm-pruner", "ratio_target": 0.2}, "pruned": {"tasks": {"wikitext2": ppl(61.0)}},
               "recover": {"steps": 10, "plot": "recovery/loss.png"}, "tasks": {"wikitext2": ppl(33.25), "piqa": zs},
               "params": {"unique": 8}}
    prov = {"params": {"unique": 8, "blocks": 6}, "export": "vanilla", "loads_with": "x", "shearkit_version": "0",
            "created": "now"}
    table = _card_table(model_card(prov, None, metrics))
    assert table[0] == ["task", "metric", "dense", "pruned, before recovery", "recovered (this model)"]
    assert table[2:] == [["wikitext2", "ppl_concat (seqlen 512)", "20.5", "61", "33.25"],
                         ["piqa", "acc", "–", "–", "0.61"], ["piqa", "acc_norm", "–", "–", "0.6"]]
    assert "None" not in model_card(prov, None, metrics)
    # a plain task -> record mapping (the `save(metrics=...)` form, and what `shearkit recover` passes)
    table = _card_table(model_card(prov, None, {"wikitext2": {"ppl": 41.5, "when": "after recovery"}}))
    assert table[0] == ["task", "metric", "this model"] and table[2:] == [["wikitext2", "ppl", "41.5"]]


def test_input_model_is_never_touched(tmp_path, tiny_tokenizer):
    src = save(make_tiny("llama"), tiny_tokenizer, tmp_path / "src")
    before = _files(src)
    model, tok = sk.load(src, device="cpu")
    sk.prune(model, tok, "structured-magnitude", 0.2)
    with pytest.raises(ShearkitError, match="loaded from"):
        save(model, tok, src, overwrite=True)
    save(model, tok, tmp_path / "out")
    assert _files(src) == before


def test_existing_target_needs_overwrite(tmp_path):
    model = make_tiny("gpt2")
    save(model, None, tmp_path / "m")
    with pytest.raises(ShearkitError, match="already exists"):
        save(model, None, tmp_path / "m")
    save(model, None, tmp_path / "m", overwrite=True)
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_peft_model_saved_merged(tmp_path):
    from test_graph import _lora

    model = _lora(make_tiny("llama"))
    ref = model(IDS).logits
    out = save(model, None, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(merged(IDS).logits, ref, rtol=1e-4, atol=1e-5)
    assert hasattr(model, "get_base_model")  # the caller's wrapper is left as it was


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_removed_blocks_and_uneven_widths_round_trip(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from shearkit.surgery import apply_structured

    model = make_tiny(family)
    apply_structured(model, sk.Plan("t", "structured", 0.1, layers={"0": {"mlp_channels": [0, 1, 2]}}, blocks=[1]))
    assert model.config.num_hidden_layers == 2
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == 2
    out = save(model, None, tmp_path / "m")
    ref = model(IDS).logits
    torch.testing.assert_close(load_shearkit_model(out)(IDS).logits, ref, rtol=0, atol=0)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(remote(IDS).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family,attn_unit,expect", [("llama", "kv_group", "vanilla"), ("gpt2", "kv_group", "per-layer"),
                                                     ("opt", "none", "vanilla")])
def test_plan_predicts_the_export_kind(tmp_path, family, attn_unit, expect):
    """GPT-2/OPT derive head_dim from hidden/heads, so head pruning there needs per-layer export."""
    model = make_tiny(family)
    plan = sk.prune(model, None, "structured-magnitude", 0.2, attn_unit=attn_unit)
    assert plan.extra["export"] == expect
    out = save(model, None, tmp_path / "m", plan=plan)
    assert json.loads((out / "shearkit.json").read_text())["export"] == expect
