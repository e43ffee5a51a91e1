"""GGUF export: layout read back by shearkit (identical logits), refusals, q8_0 fallback, and
llama.cpp's own logits and tokens (through llama-cpp-python, when it is installed)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from conftest import VOCAB, make_tiny

import shearkit as sk
from shearkit.errors import ShearkitError
from shearkit.eval import llama_cpp as llama_cpp_run
from shearkit.eval.perplexity import eval_windows
from shearkit.io.gguf_export import export_gguf, rope_pairs
from shearkit.io.gguf_load import load_shearkit_gguf
from shearkit.surgery import apply_structured

IDS = [5, 17, 42, 100, 7, 300, 64, 64, 1, 250, 99, 12, 3, 180, 33, 21]


def _uniform():
    return make_tiny("llama")


def _per_layer():
    """Per-layer widths with GQA: layer 0 loses a KV group (2 of 4 query heads), layer 1 a third of its MLP."""
    m = make_tiny("llama")
    apply_structured(m, sk.Plan("t", "structured", 0.2, layers={"0": {"kv_groups": [1]},
                                                                "1": {"mlp_channels": list(range(32))}}))
    return m


def _fewer_layers():
    m = make_tiny("llama")
    apply_structured(m, sk.Plan("t", "blocks", 0.3, blocks=[1]))
    return m


KINDS = {"uniform": (_uniform, "llama"), "per-layer": (_per_layer, "deci"), "fewer-layers": (_fewer_layers, "llama")}


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_identical_logits(kind, tmp_path, tiny_tokenizer):
    build, arch = KINDS[kind]
    model = build()
    r = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", outtype="f32")
    assert r.architecture == arch
    back, tok = sk.load(tmp_path / "m.gguf", device="cpu", dtype="float32")
    assert len(back.model.layers) == len(model.model.layers)
    np.testing.assert_array_equal(_logits(back, IDS), _logits(model, IDS))
    assert tok("the quick brown fox")["input_ids"] == tiny_tokenizer("the quick brown fox")["input_ids"]


def test_deci_layers_keep_their_sizes(tmp_path, tiny_tokenizer):
    model = _per_layer()
    r = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", outtype="f32")
    views = sk.get_adapter(model).blocks()
    assert [g.heads for g in r.layers] == [b.attn.num_heads for b in views]
    assert [g.kv_heads for g in r.layers] == [b.attn.num_kv_heads for b in views]
    assert [g.ff for g in r.layers] == [b.mlp.width for b in views]
    back, _ = load_shearkit_gguf(tmp_path / "m.gguf")
    # the reloaded model records its per-layer widths as shearkit does, so it saves and loads again
    sk.save(back, None, tmp_path / "dir")
    from shearkit.io.modeling import load_shearkit_model

    again = load_shearkit_model(tmp_path / "dir")
    np.testing.assert_array_equal(_logits(again, IDS), _logits(model, IDS))


def test_rope_pairs_inverse_and_layout():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of size 8
    p = rope_pairs(w, 2)
    # head 0: rows (0, 4), (1, 5), ... become adjacent
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(rope_pairs(p, 2, inverse=True), w)


def test_q8_0_falls_back_to_f16_for_short_rows(tmp_path, tiny_tokenizer):
    model = _per_layer()  # hidden 64 (multiple of 32); MLP widths 96 and 64; down_proj rows of 96 ok, of 64 ok
    apply_structured(model, sk.Plan("t", "structured", 0.1, layers={"2": {"mlp_channels": [0, 1, 2]}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", outtype="q8_0")
    assert r.f16_fallback == ["blk.2.ffn_down.weight"]  # rows of 93 values
    assert any("f16" in str(w.message) for w in caught)
    from gguf import GGMLQuantizationType as Q, GGUFReader

    types = {t.name: t.tensor_type for t in GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.2.ffn_down.weight"] == Q.F16 and types["blk.2.ffn_up.weight"] == Q.Q8_0
    back, _ = sk.load(tmp_path / "q.gguf", device="cpu", dtype="float32")
    ref, got = _logits(model, IDS), _logits(back, IDS)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # quantised, close


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_refuses_other_families(family, tmp_path, tiny_tokenizer):
    with pytest.raises(ShearkitError, match="Llama family"):
        export_gguf(make_tiny(family), tiny_tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_per_layer_qwen2_biases(tmp_path, tiny_tokenizer):
    m = make_tiny("qwen2")
    apply_structured(m, sk.Plan("t", "structured", 0.1, layers={"1": {"kv_groups": [0]}}))
    with pytest.raises(ShearkitError, match="layer 1 .*biases"):
        export_gguf(m, tiny_tokenizer, tmp_path / "m.gguf")


def test_uniform_qwen2_exports_with_biases(tmp_path, tiny_tokenizer):
    m = make_tiny("qwen2")
    r = export_gguf(m, tiny_tokenizer, tmp_path / "m.gguf", outtype="f32")
    assert r.architecture == "qwen2"
    back, _ = sk.load(tmp_path / "m.gguf", device="cpu", dtype="float32")
    np.testing.assert_array_equal(_logits(back, IDS), _logits(m, IDS))


def test_refuses_llama_bias_naming_layer(tmp_path, tiny_tokenizer):
    m = make_tiny("llama")
    o = m.model.layers[2].self_attn.o_proj
    o.bias = torch.nn.Parameter(torch.zeros(o.out_features))
    with pytest.raises(ShearkitError, match="layer 2 .*o_proj has a bias"):
        export_gguf(m, tiny_tokenizer, tmp_path / "m.gguf")


def test_refuses_shared_blocks(tmp_path, tiny_tokenizer):
    from shearkit.surgery.shared_block import share_block

    m = make_tiny("llama")
    share_block(m, 2, 1, rank=2)
    with pytest.raises(ShearkitError, match="FlexiGPT"):
        export_gguf(m, tiny_tokenizer, tmp_path / "m.gguf")


def test_refuses_zero_mlp_layer(tmp_path, tiny_tokenizer):
    from shearkit.io.gguf_export import plan_layout

    m = _per_layer()
    mlp = m.model.layers[1].mlp
    for name in ("gate_proj", "up_proj"):
        setattr(mlp, name, torch.nn.Linear(64, 0, bias=False))
    mlp.down_proj = torch.nn.Linear(0, 64, bias=False)
    with pytest.raises(ShearkitError, match="layer 1 .*no MLP channels"):
        plan_layout(m)


def test_refuses_unknown_pre_tokenizer(tmp_path, tiny_tokenizer):
    import copy

    from tokenizers import pre_tokenizers

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ShearkitError, match="pre-tokenizer"):
        export_gguf(make_tiny("llama"), tok, tmp_path / "m.gguf")


def test_refuses_compressed_folder_and_bad_outtype(tmp_path, tiny_tokenizer):
    import json

    d = tmp_path / "ct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask"}}}))
    with pytest.raises(ShearkitError, match="compressed-tensors"):
        sk.export_gguf(d, tmp_path / "m.gguf")
    with pytest.raises(ShearkitError, match="outtype"):
        export_gguf(make_tiny("llama"), tiny_tokenizer, tmp_path / "m.gguf", outtype="q4_k")


def test_cli_export_and_pipeline_save_format(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from shearkit.cli import app

    out = tmp_path / "cli.gguf"
    res = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--format", "gguf", "--out", str(out),
                                   "--outtype", "f32"])
    assert res.exit_code == 0, res.output
    assert "llama, 3 layers" in res.output
    base, _ = sk.load(tiny_model_dir, device="cpu", dtype="float32")
    back, _ = sk.load(out, device="cpu", dtype="float32")
    np.testing.assert_array_equal(_logits(back, IDS), _logits(base, IDS))
    res = CliRunner().invoke(app, ["export", str(tiny_model_dir), "--out", str(out)])
    assert res.exit_code != 0 and "already exists" in str(res.exception or res.output)


def test_prune_save_format_gguf(tmp_path, tiny_model_dir, text_file):
    """`prune --save-format gguf` writes RUN/model.gguf beside the Hugging Face folder, same logits."""
    from typer.testing import CliRunner

    from shearkit.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, [str(a) for a in (
        "prune", tiny_model_dir, "--method", "llm-pruner", "--ratio", "0.3", "--calib", text_file, "--calib-samples",
        2, "--calib-seqlen", 16, "--tasks", text_file, "--eval-seqlen", 16, "--limit", 1, "--no-dense-eval",
        "--save-format", "gguf", "--out", run)])
    assert res.exit_code == 0, res.output
    hf, _ = sk.load(run / "model", device="cpu", dtype="float32")
    back, _ = sk.load(run / "model.gguf", device="cpu", dtype="float32")
    np.testing.assert_allclose(_logits(back, IDS), _logits(hf, IDS), rtol=0, atol=1e-2 * np.abs(_logits(hf, IDS)).max())


def test_prune_round_to_keeps_every_row_quantisable(tmp_path, tiny_model_dir, text_file, tiny_tokenizer):
    """`prune --round-to 32`: every kept MLP width is a multiple of 32, so q8_0 needs no f16 fallback;
    a method without widths refuses the option before loading anything."""
    from typer.testing import CliRunner

    from shearkit.cli import app

    common = ["--calib", text_file, "--calib-samples", 2, "--calib-seqlen", 16, "--tasks", text_file,
              "--eval-seqlen", 16, "--limit", 1, "--no-dense-eval"]
    run = tmp_path / "run"
    res = CliRunner().invoke(app, [str(a) for a in ("prune", tiny_model_dir, "--method", "llm-pruner", "--ratio", 0.3,
                                                    "--round-to", 32, *common, "--out", run)])
    assert res.exit_code == 0, res.output
    model, _ = sk.load(run / "model", device="cpu", dtype="float32")
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert min(widths) < 96 and all(w % 32 == 0 for w in widths), widths
    assert export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", outtype="q8_0").f16_fallback == []
    res = CliRunner().invoke(app, [str(a) for a in ("prune", tiny_model_dir, "--method", "wanda", "--ratio", 0.5,
                                                    "--round-to", 32, *common, "--out", tmp_path / "w")])
    assert res.exit_code != 0 and "round_to" in str(res.exception or res.output)


# ---- llama.cpp itself -------------------------------------------------------------------------

def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("SHEARKIT_REQUIRE_LLAMA_CPP"):  # set where llama-cpp-python must be present
            pytest.fail("llama-cpp-python is required here (SHEARKIT_REQUIRE_LLAMA_CPP) but not importable")
        pytest.skip("llama-cpp-python is not installed (docs/export.md says how to build it for this CPU)")
    return llama_cpp


def _llama_cpp_logits(path, ids):
    _llama_cpp()
    llm = llama_cpp_run.open_gguf(path, n_ctx=64, logits_all=True)
    out = llama_cpp_run.logits(llm, ids)
    llm.close()
    return out


# the three kinds, and the other families and layouts the exporter writes
LLAMA_CPP_KINDS = {**KINDS, "qwen2": (lambda: make_tiny("qwen2"), "qwen2"),
                   "mistral": (lambda: make_tiny("mistral"), "llama"),
                   "tied-embeddings": (lambda: make_tiny("llama_tied"), "llama")}


@pytest.mark.parametrize("kind", list(LLAMA_CPP_KINDS))
def test_llama_cpp_logits_match(kind, tmp_path, tiny_tokenizer):
    _llama_cpp()
    build, arch = LLAMA_CPP_KINDS[kind]
    model = build()
    assert export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", outtype="f32").architecture == arch
    ours, theirs = _logits(model, IDS), _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert theirs.shape == ours.shape == (len(IDS), VOCAB)
    assert np.abs(theirs - ours).max() <= 1e-3 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_llama_cpp_runs_q8_0_with_f16_fallback(tmp_path, tiny_tokenizer):
    _llama_cpp()
    model = _per_layer()
    apply_structured(model, sk.Plan("t", "structured", 0.1, layers={"2": {"mlp_channels": [0, 1, 2]}}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", outtype="q8_0")
    assert r.f16_fallback == ["blk.2.ffn_down.weight"]
    ours, theirs = _logits(model, IDS), _llama_cpp_logits(tmp_path / "q.gguf", IDS)
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()


def test_llama_cpp_tokenises_like_hf(tmp_path, tiny_tokenizer):
    llama_cpp = _llama_cpp()
    export_gguf(make_tiny("llama"), tiny_tokenizer, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in ("the quick brown fox", "hello world, this is a test of shearkit 123", " pruning  models!"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    llm.close()


def _split_tokenizer(pattern: str, ignore_merges: bool):
    """A byte-level BPE tokenizer with a Llama 3 / Qwen2-style pre-tokenizer: a regex Split, then ByteLevel
    without its own regex, trained in-process on text with digits, contractions and new lines."""
    import json as _json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["It's 2024 and we'll prune 12345 models!", "the quick brown fox\n\n  jumps over the lazy dog",
            "I'M sure they'd say: 3.14159 isn't 42"] * 20
    tk.train_from_iterator(text, trainer)
    spec = _json.loads(tk.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_llama_cpp_tokenises_llama3_and_qwen2_pre_tokenizers_like_hf(name, tmp_path):
    """Llama 3's and Qwen2's split regexes are recognised, named for llama.cpp, and llama.cpp then splits
    text (digit runs, contractions in any case, new lines, runs of spaces) exactly as the HF tokenizer."""
    from shearkit.io import gguf_vocab

    pattern, ignore = {"llama-bpe": (gguf_vocab._LLAMA3_SPLIT, True), "qwen2": (gguf_vocab._QWEN2_SPLIT, False)}[name]
    tok = _split_tokenizer(pattern, ignore)
    assert gguf_vocab.vocab_fields(tok, VOCAB)["pre"] == name
    with pytest.raises(ShearkitError, match="ignore_merges"):
        gguf_vocab.vocab_fields(_split_tokenizer(pattern, not ignore), VOCAB)
    llama_cpp = _llama_cpp()
    export_gguf(make_tiny("llama"), tok, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in ("It's 2024: 1234567 models", "WE'LL SEE\n\n\n   spaces   here", "they'd 3.14159\tx",
                 "naïve café", " leading and trailing  "):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tok(text, add_special_tokens=False)["input_ids"], text
    llm.close()


def _greedy_torch(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def _greedy_llama_cpp(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = list(ids)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


@pytest.mark.slow
def test_llama_cpp_runs_pruned_smollm(tmp_path, data_dir):
    """SmolLM2-135M pruned 20% by llm-pruner (per-layer widths: deci): llama.cpp tokenises like the
    Hugging Face tokenizer, generates the same 32 greedy tokens, and its perplexity agrees within 1%."""
    _llama_cpp()
    from shearkit.recipe import CalibConfig

    model, tok = sk.load("smollm2-135m", device="cpu", dtype="float32")
    sk.prune(model, tok, "llm-pruner", 0.2, calib=CalibConfig(samples=4, seqlen=256), data_dir=data_dir)
    r = export_gguf(model, tok, tmp_path / "p.gguf", outtype="f32")
    assert r.architecture == "deci" and len({g.ff for g in r.layers}) > 1
    llm = llama_cpp_run.open_gguf(tmp_path / "p.gguf", n_ctx=512, threads=2, logits_all=True)
    for text in ("The capital of France is", "In 2023, 1,234 people paid $56.78 each!", "naïve café   tabs\tand\n"
                 "new lines", "<|im_start|>user hi"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok(text, add_special_tokens=False)["input_ids"], text
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert _greedy_llama_cpp(llm, prompt, 32) == _greedy_torch(model, prompt, 32)
    windows, _, _ = eval_windows(tok, "wikitext2", 512, limit=8, data_dir=data_dir)
    ours = sk.evaluate(model, tok, ["wikitext2"], seqlen=512, limit=8, data_dir=data_dir)["wikitext2"]["ppl"]
    theirs = llama_cpp_run.perplexity(llm, windows)["ppl"]
    llm.close()
    assert abs(theirs - ours) <= 0.01 * ours, (theirs, ours)
