"""Model extension (surgery/extend.py, extension.py, cli/extend_cmds.py): where the copies go, that
removing exactly the copies gives back the original, what holds at init, one storage, reloads to
the same logits and cached decoding, what trains, the command line, and what is refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import shearkit
from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.io.remote_code import SharedLinear
from shearkit.surgery import remove_blocks
from shearkit.surgery.extend import extend_blocks, extension_layout
from shearkit.surgery.shared_block import share_block, shared_parameters

from conftest import make_tiny
from test_flexigpt import PATHS, PROBE, _logits


def _perturb(model) -> None:
    """Give the copies' adapters and norm scales values (as training would), so they matter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in shared_parameters(model).values():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.05)


def test_layouts_place_copies_after_their_originals():
    assert extension_layout(5, 2, "block", 1, 2) == ([0, 1, 1, 2, 2, 3, 4], [2, 4])
    assert extension_layout(5, 4, "block", 1, 2) == ([0, 1, 1, 1, 2, 2, 2, 3, 4], [2, 3, 5, 6])
    assert extension_layout(5, 2, "sequential", 1, 2) == ([0, 1, 2, 1, 2, 3, 4], [3, 4])
    assert extension_layout(5, 4, "sequential", 1, 2) == ([0, 1, 2, 1, 2, 1, 2, 3, 4], [3, 4, 5, 6])
    assert extension_layout(3, 3, "block") == ([0, 0, 1, 1, 2, 2], [1, 3, 5])  # default span: every block
    assert extension_layout(3, 1, "sequential", 2, 2) == ([0, 1, 2, 2], [3])


@pytest.mark.parametrize("pattern", ["block", "sequential"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "llama_tied"])
def test_removing_exactly_the_copies_gives_back_the_original(family, pattern):
    """The key property: the originals are untouched, so extending by K shared blocks and then
    removing exactly those K blocks (renumbered by the same block surgery) restores the model."""
    dense = make_tiny(family)
    model = copy.deepcopy(dense)
    n = dense.config.num_hidden_layers
    out = extend_blocks(model, 2 * (n - 1), pattern, 1, n - 1, rank=3)
    assert model.config.num_hidden_layers == n + 2 * (n - 1) == get_adapter(model).num_layers
    idx = [getattr(b.self_attn, "layer_idx", None) for b in get_adapter(model).layers]
    assert idx == list(range(len(idx)))  # every position its own KV-cache slot
    types = getattr(dense.config, "layer_types", None)
    if types is not None:
        assert model.config.layer_types == [types[s] for s in out["sources"]]
    _perturb(model)
    assert not torch.allclose(_logits(model), _logits(dense), atol=1e-3)
    remove_blocks(model, out["copies"])
    assert torch.equal(_logits(model), _logits(dense))
    assert model.config.num_hidden_layers == n and getattr(model.config, "layer_types", None) == types
    assert not any(isinstance(mod, SharedLinear) for mod in model.modules())
    with torch.no_grad():
        a = model.generate(PROBE[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = dense.generate(PROBE[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_at_init_a_copy_adds_a_standardised_vector_of_rms_norm_init():
    """B = 0, so a copy's sub-layer computes its original's output on its own input; the output norm
    makes that zero-mean with RMS <= norm_init per token (equal up to eps). With norm_init = 0 the
    extended model computes exactly the original's logits."""
    dense = make_tiny("llama")
    exact = copy.deepcopy(dense)
    extend_blocks(exact, 3, "block", rank=4, norm_init=0.0)
    assert torch.equal(_logits(exact), _logits(dense))
    model = copy.deepcopy(dense)
    c = 0.02
    out = extend_blocks(model, 3, "block", rank=4, norm_init=c)
    layers = get_adapter(model).layers
    seen = {}
    hooks = [layers[j].get_submodule(p).register_forward_hook(
        lambda mod, i, o, key=(j, p): seen.__setitem__(key, (mod, i[0], o)))
        for j in out["copies"] for p in ("self_attn.o_proj", "mlp.down_proj")]
    for j in out["copies"]:
        for p in PATHS:
            layer = layers[j].get_submodule(p)
            assert torch.all(layer.adapter_b == 0) and torch.any(layer.adapter_a != 0)  # LoRA init
            assert (layer.out_norm is not None) == (p in ("self_attn.o_proj", "mlp.down_proj"))
    assert not any(isinstance(mod, SharedLinear) for j in range(0, 6, 2) for mod in layers[j].modules())
    _logits(model)
    for h in hooks:
        h.remove()
    assert len(seen) == 6
    for layer, x, o in seen.values():
        h = torch.nn.functional.linear(x, layer.weight).double()  # the original's projection, nothing added
        want = c * (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(o.double(), want, atol=1e-7, rtol=1e-4)
        rms = o.double().pow(2).mean(-1).sqrt()
        assert torch.all(o.double().mean(-1).abs() < 1e-8) and torch.all(rms <= c) and torch.all(rms > 0)
    small = copy.deepcopy(dense)
    extend_blocks(small, 3, "block", rank=4, norm_init=c / 10)
    gap = lambda m: float((_logits(m) - _logits(dense)).abs().max())  # noqa: E731
    assert 0 < gap(small) < gap(model)  # the deviation from the original shrinks with the scale


def test_shared_weights_are_one_storage_and_counted_once(tmp_path, tiny_tokenizer):
    from safetensors import safe_open

    dense = make_tiny("llama")
    model = copy.deepcopy(dense)
    out = extend_blocks(model, 2, "sequential", 1, 2, rank=3)
    layers = get_adapter(model).layers
    assert out["bases"] == {3: 1, 4: 2}
    for j, base in out["bases"].items():
        for p in PATHS:
            assert layers[j].get_submodule(p).weight is layers[base].get_submodule(p).weight
            assert layers[j].get_submodule(p).weight.data_ptr() == layers[base].get_submodule(p).weight.data_ptr()
        assert layers[j].input_layernorm.weight.data_ptr() != layers[base].input_layernorm.weight.data_ptr()
    own = sum(3 * (layers[3].get_submodule(p).in_features + layers[3].get_submodule(p).out_features) for p in PATHS)
    hidden = model.config.hidden_size
    counts, before = get_adapter(model).param_counts(), get_adapter(dense).param_counts()
    assert counts["unique"] == counts["total"] == before["unique"] + 2 * (own + 2 * hidden + 2 * hidden)
    saved = shearkit.save(model, tiny_tokenizer, tmp_path / "m")
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert sum(1 for k in keys if k.endswith("q_proj.weight")) == 3  # five blocks, three stored q weights
    assert not any(k.startswith(("model.layers.3.", "model.layers.4.")) and k.endswith("proj.weight") for k in keys)


@pytest.mark.parametrize("pattern", ["block", "sequential"])
def test_reload_gives_identical_logits_and_cached_decoding(pattern, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny("mistral")
    rec = shearkit.extend(model, tiny_tokenizer, add_blocks=2, pattern=pattern, start=0, end=1, rank=4,
                          training=False)
    _perturb(model)
    want = _logits(model)
    out = shearkit.save(model, tiny_tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and sorted(map(int, config["shearkit_shared_blocks"]["blocks"])) == \
        rec["copies"]
    loaded, _ = shearkit.load(out, device="cpu", dtype="float32")
    remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    for m in (loaded, remote):
        assert torch.equal(_logits(m), want)
        layers = get_adapter(m).layers
        for j, base in rec["bases"].items():
            assert layers[j].mlp.up_proj.weight.data_ptr() == layers[base].mlp.up_proj.weight.data_ptr()
        with torch.no_grad():
            cached = m.generate(PROBE[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            plain = m.generate(PROBE[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(cached, plain)
        assert get_adapter(m).param_counts() == get_adapter(model).param_counts()


def test_training_changes_only_the_copies_adapters_and_scales(tmp_path, text_file, tiny_tokenizer):
    dense = make_tiny("llama")
    model = copy.deepcopy(dense)
    train = {"steps": 3, "data": str(text_file), "seqlen": 16, "batch_size": 2, "lr": 1e-2}
    rec = shearkit.extend(model, tiny_tokenizer, add_blocks=1, start=1, end=1, rank=4, train=train,
                          run_dir=tmp_path / "run")
    assert rec["copies"] == [2] and rec["train"]["steps_done"] == 3
    assert (tmp_path / "run" / "extend" / "train_log.jsonl").is_file()
    fresh = copy.deepcopy(dense)
    torch.manual_seed(0)  # the runner seeds the adapters' init with its seed (0)
    extend_blocks(fresh, 1, "block", 1, 1, rank=4)
    before, now = fresh.state_dict(), model.state_dict()
    assert before.keys() == now.keys()
    moved = sorted(k for k in now if not torch.equal(now[k], before[k]))
    assert moved and all(k.startswith("model.layers.2.") and k.endswith(("adapter_a", "adapter_b", "out_norm.weight"))
                         for k in moved)
    assert any(k.endswith("adapter_b") for k in moved)  # B left zero


def test_bad_input_is_refused():
    with pytest.raises(ShearkitError, match=r"4 added blocks cannot be placed over blocks 0\.\.2 \(3 blocks\).*"
                                            r"multiple of 3 \(3, 6, 9, 12.*divides 4 \(1, 2 blocks\)"):
        extension_layout(3, 4, "block")
    with pytest.raises(ShearkitError, match="multiple of 2"):
        extension_layout(5, 3, "sequential", 1, 2)
    with pytest.raises(ShearkitError, match=r"start 2 to end 1, must lie within blocks 0\.\.2"):
        extension_layout(3, 1, "block", 2, 1)
    with pytest.raises(ShearkitError, match="within blocks 0..2"):
        extension_layout(3, 1, "block", 0, 3)
    with pytest.raises(ShearkitError, match="pattern must be one of block, sequential"):
        extension_layout(3, 3, "interleaved")
    with pytest.raises(ShearkitError, match="built for the llama family"):
        extend_blocks(make_tiny("gpt2"), 3, rank=2)
    with pytest.raises(ShearkitError, match="built for the llama family"):
        shearkit.extend(make_tiny("opt"), add_blocks=3, training=False)
    shared = make_tiny("llama")
    share_block(shared, 1, 0, 2)
    with pytest.raises(ShearkitError, match="weight-shared blocks.*extending it"):
        shearkit.extend(shared, add_blocks=3, training=False)
    with pytest.raises(ShearkitError, match="--add-blocks K"):
        shearkit.extend(make_tiny("llama"), training=False)
    with pytest.raises(ShearkitError, match="extend.pattern must be one of"):
        shearkit.extend(make_tiny("llama"), add_blocks=3, pattern="zigzag")
    with pytest.raises(ShearkitError, match=r"extend.rank=33 exceeds .*extend.rank <= 32"):
        shearkit.extend(make_tiny("llama"), add_blocks=3, rank=33, training=False)
    with pytest.raises(ShearkitError, match="extend.train.alpha does not apply"):
        shearkit.extend(make_tiny("llama"), add_blocks=3, train={"alpha": 4})
    with pytest.raises(ShearkitError, match="needs the tokenizer"):
        shearkit.extend(make_tiny("llama"), add_blocks=3)
    model = make_tiny("llama")
    with pytest.raises(ShearkitError, match="cannot be placed"):
        shearkit.extend(model, add_blocks=2, training=False)
    assert model.config.num_hidden_layers == 3  # refused before anything changed


def test_command_line_end_to_end(tiny_model_dir, tmp_path, text_file):
    from shearkit.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["extend", str(tiny_model_dir), "--add-blocks", "2", "--pattern", "sequential",
                                 "--start", "1", "--end", "2", "--rank", "4", "--steps", "2", "--data", str(text_file),
                                 "--set", "extend.train.seqlen=16", "--set", "extend.train.batch_size=2",
                                 "--tasks", str(text_file), "--eval-seqlen", "16", "--limit", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    ext = metrics["extend"]
    assert ext["copies"] == [3, 4] and ext["blocks_after"] == 5 and ext["train"]["steps_done"] == 2
    assert set(metrics["dense"]["tasks"]) == set(metrics["tasks"]) == {str(text_file)}
    assert (out / "extend" / "train_log.jsonl").is_file() and (out / "model" / "modeling_shearkit.py").is_file()
    model, _ = shearkit.load(out / "model", device="cpu", dtype="float32")
    assert model.config.num_hidden_layers == 5
    assert isinstance(get_adapter(model).layers[3].self_attn.q_proj, SharedLinear)
    bad = CliRunner().invoke(app, ["extend", str(tiny_model_dir), "--add-blocks", "2", "--steps", "0", "--no-dense-eval",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "cannot be placed over blocks 0..2" in str(bad.exception)
    assert not (tmp_path / "bad" / "model").exists()


def test_the_same_seed_builds_the_same_copies_and_a_run_recipe_is_sent_to_extend():
    """A resumed run rebuilds the copies before restoring their checkpoint: the seed fixes their init."""
    from shearkit.pipeline import run_pipeline
    from shearkit.recipe import load_recipe

    a, b, c = make_tiny("llama"), make_tiny("llama"), make_tiny("llama")
    for m, seed in ((a, 3), (b, 3), (c, 4)):
        shearkit.extend(m, add_blocks=3, rank=4, seed=seed, training=False)
    pa, pb, pc = shared_parameters(a), shared_parameters(b), shared_parameters(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa) and not all(torch.equal(pa[k], pc[k]) for k in pa)
    with pytest.raises(ShearkitError, match="shearkit extend --recipe"):
        run_pipeline(load_recipe("extend"))
