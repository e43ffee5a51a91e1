"""Models larger than memory (issue 16 item 1): blocks stay on disk and are loaded one at a time.

Ground truth is the same model loaded whole: identical logits, identical pruned weights and plans, the
same perplexity, saved models with identical tensors; the input files never change; a child process's
anonymous RSS holds about one block, not the model.
"""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import shearkit
from shearkit.cli import app
from shearkit.errors import ShearkitError
from shearkit.eval.perplexity import window_nll
from shearkit.io.lazy import is_lazy, load_lazy, loaded_block, needs_lazy, weight_bytes
from shearkit.io.save import save

from conftest import make_tiny

FAMILIES = ["llama", "llama_tied", "opt", "gpt2"]


def saved(tmp_path, family, name="base", tokenizer=None):
    d = tmp_path / name
    make_tiny(family).save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d


def hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def tensors(folder):
    """Every tensor of a saved model's safetensors files, by name."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def saved_alike(tmp_path, whole, p_whole, lazy, p_lazy):
    """Save the whole and the lazy model (each with its plan) and check the files hold the same tensors."""
    a, b = tmp_path / "a", tmp_path / "b"
    save(whole, None, a, plan=p_whole)
    save(lazy, None, b, plan=p_lazy)
    ta, tb = tensors(a), tensors(b)
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    return a, b


def block_is_on_disk(model):
    return all(p.is_meta for b in shearkit.get_adapter(model).layers for p in b.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_lazy_model_gives_the_same_logits_with_blocks_left_on_disk(tmp_path, family):
    d = saved(tmp_path, family)
    whole = make_tiny(family)
    lazy = load_lazy(d)
    assert is_lazy(lazy) and block_is_on_disk(lazy)
    ids = torch.randint(0, 300, (2, 24))
    assert torch.equal(whole(input_ids=ids).logits, lazy(input_ids=ids).logits)
    assert block_is_on_disk(lazy)  # each block was freed after its forward
    assert torch.equal(window_nll(whole, ids, desc=None), window_nll(lazy, ids, desc=None))  # perplexity's sums
    counts = shearkit.get_adapter(lazy).param_counts()
    assert counts == shearkit.get_adapter(whole).param_counts()


@pytest.mark.parametrize("family,method", [("llama", "wanda"), ("llama", "sparsegpt"), ("gpt2", "wanda"),
                                           ("opt", "magnitude"), ("llama_tied", "sparsegpt"), ("llama", "besa"), ("llama", "shortgpt"),
                                           ("gpt2", "shortgpt")])
def test_pruning_block_by_block_equals_pruning_the_whole_model(tmp_path, family, method):
    d = saved(tmp_path, family)
    before = hashes(d)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = {"blocks": 1} if method == "shortgpt" else {"ratio": 0.5}
    whole = make_tiny(family)
    p_whole = shearkit.prune(whole, None, method, calib=calib, **opts)
    lazy = load_lazy(d)
    p_lazy = shearkit.prune(lazy, None, method, calib=calib, **opts)
    assert block_is_on_disk(lazy)
    assert p_lazy.base["fingerprint"] == p_whole.base["fingerprint"]  # read block by block, the same weights
    assert p_lazy.ratio_achieved == p_whole.ratio_achieved and p_lazy.layers == p_whole.layers
    if p_whole.masks is not None:
        assert set(p_lazy.masks) == set(p_whole.masks)
        assert all(torch.equal(p_lazy.masks[k], p_whole.masks[k]) for k in p_whole.masks)
    ids = torch.randint(0, 300, (2, 24))
    assert torch.equal(whole(input_ids=ids).logits, lazy(input_ids=ids).logits)
    a, b = saved_alike(tmp_path, whole, p_whole, lazy, p_lazy)
    assert len(list(b.glob("model-*.safetensors"))) == shearkit.get_adapter(lazy).num_layers + 1  # one shard a block
    pa, pb = json.loads((a / "shearkit.json").read_text()), json.loads((b / "shearkit.json").read_text())
    assert pa["fingerprint"] == pb["fingerprint"] and pa["sparsity_measured"] == pb["sparsity_measured"]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(b)  # vanilla transformers reads the sharded folder
    assert torch.equal(reloaded(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert hashes(d) == before  # the input model is never written


@pytest.mark.parametrize("family,allocation", [("llama", "global"), ("gpt2", "uniform"), ("opt", "global")])
def test_structured_cuts_block_by_block_equal_the_whole_model(tmp_path, family, allocation):
    """structured-magnitude on a lazy model: scored and sliced one block at a time (each cut block written
    to its own shard with its new shapes); per-layer widths saved by streaming reload to the same logits."""
    d = saved(tmp_path, family)
    whole, lazy = make_tiny(family), load_lazy(d)
    p_w = shearkit.prune(whole, None, "structured-magnitude", 0.3, allocation=allocation)
    p_l = shearkit.prune(lazy, None, "structured-magnitude", 0.3, allocation=allocation)
    assert p_l.layers == p_w.layers and p_l.ratio_achieved == p_w.ratio_achieved
    assert block_is_on_disk(lazy)
    ids = torch.randint(0, 300, (2, 24))
    assert torch.equal(lazy(input_ids=ids).logits, whole(input_ids=ids).logits)
    a, b = saved_alike(tmp_path, whole, p_w, lazy, p_l)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    from shearkit.io.modeling import load_shearkit_model, needs_modeling_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((b / "config.json").read_text())
    reloaded = load_shearkit_model(b) if needs_modeling_file(cfg) else AutoModelForCausalLM.from_pretrained(b)
    assert torch.equal(reloaded(input_ids=ids).logits, whole(input_ids=ids).logits)


def test_loaded_block_restores_the_block_to_disk_and_keeps_changes_only_when_asked(tmp_path):
    d = saved(tmp_path, "llama")
    lazy = load_lazy(d)
    block = shearkit.get_adapter(lazy).layers[0]
    with loaded_block(lazy, block) as b:
        w = b.mlp.down_proj.weight
        assert not w.is_meta
        w.data.zero_()  # read-only use: not kept
    assert block_is_on_disk(lazy)
    with loaded_block(lazy, block) as b:
        assert b.mlp.down_proj.weight.abs().sum() > 0
    with loaded_block(lazy, block, write=True) as b:
        b.mlp.down_proj.weight.data.zero_()
    with loaded_block(lazy, block) as b:
        assert b.mlp.down_proj.weight.abs().sum() == 0
    assert len(list(lazy._shearkit_lazy.work_dir.glob("*.safetensors"))) == 1


def test_methods_that_need_the_whole_model_are_refused(tmp_path):
    lazy = load_lazy(saved(tmp_path, "llama"))
    calib = torch.randint(0, 300, (2, 16))
    with pytest.raises(ShearkitError, match="Method 'llm-pruner' needs the whole model.*besa, magnitude, shortgpt, sparsegpt, structured-magnitude, wanda,"):
        shearkit.prune(lazy, None, "llm-pruner", 0.2, calib=calib)
    with pytest.raises(ShearkitError, match="A dry run copies the model"):
        shearkit.prune(lazy, None, "wanda", 0.5, calib=calib, dry_run=True)


def test_max_memory_loads_whole_lazily_or_refuses(tmp_path, tiny_tokenizer):
    d = saved(tmp_path, "llama", tokenizer=tiny_tokenizer)
    whole_b, stem_b, block_b = weight_bytes(d, torch.float32)
    model = make_tiny("llama")
    assert whole_b == model.num_parameters() * 4
    assert block_b == sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    assert stem_b == whole_b - block_b * len(model.model.layers)
    assert not needs_lazy(d, torch.float32, whole_b)
    assert needs_lazy(d, torch.float32, whole_b - 1)
    m, _ = shearkit.load(d, device="cpu", max_memory=str(whole_b))
    assert not is_lazy(m)
    m, _ = shearkit.load(d, device="cpu", max_memory=f"{(stem_b + 2 * block_b) / 1e3}KB")
    assert is_lazy(m)
    with pytest.raises(ShearkitError, match="--max-memory 1KB .* too small.*Raise --max-memory to at least"):
        shearkit.load(d, device="cpu", max_memory="1KB")
    for bad in ("lots", "-5GB", "0"):
        with pytest.raises(ShearkitError, match="--max-memory must be a positive size"):
            shearkit.load(d, device="cpu", max_memory=bad)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ShearkitError, match="not a model directory or a built-in name"):
        shearkit.load(gguf, lazy=True)


def test_cli_prune_lazy_matches_the_whole_model_run_and_refuses_recovery(tmp_path, tiny_tokenizer, monkeypatch):
    runner = CliRunner()
    d = saved(tmp_path, "llama", tokenizer=tiny_tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. pruning makes language models smaller.\n" * 300)
    monkeypatch.chdir(tmp_path)
    common = [str(d), "--method", "sparsegpt", "--ratio", "0.5", "--calib", str(text), "--calib-samples", "4",
              "--calib-seqlen", "16", "--tasks", str(text), "--eval-seqlen", "16", "--limit", "2"]
    for out, extra in (("whole", []), ("lazy", ["--lazy"])):
        r = runner.invoke(app, ["prune", *common, "--out", out, *extra])
        assert r.exit_code == 0, (r.output, r.exception)
    mw, ml = (json.loads((tmp_path / o / "metrics.json").read_text()) for o in ("whole", "lazy"))
    assert mw["tasks"] == ml["tasks"] and mw["dense"]["tasks"] == ml["dense"]["tasks"]
    tw, tl = tensors(tmp_path / "whole" / "model"), tensors(tmp_path / "lazy" / "model")
    assert set(tw) == set(tl) and all(torch.equal(tw[k], tl[k]) for k in tw)
    assert not (tmp_path / "lazy" / "lazy-blocks").exists()  # the pruned blocks' work folder went with the save
    recipe = (tmp_path / "lazy" / "recipe.yaml").read_text()
    assert "lazy: true" in recipe
    r = runner.invoke(app, ["prune", *common, "--out", "rec", "--lazy", "--recover", "2"])
    assert isinstance(r.exception, ShearkitError) and "LoRA recovery needs the whole model" in str(r.exception)
    r = runner.invoke(app, ["prune", *common, "--out", "gguf", "--lazy", "--save-format", "gguf"])
    assert isinstance(r.exception, ShearkitError) and "save_format gguf needs the whole model" in str(r.exception)


def test_peak_memory_is_about_one_block(tmp_path, tiny_tokenizer):
    """Anonymous RSS of a child process (file-backed pages of the safetensors do not count): a Wanda prune
    and save of an 8-block model loaded lazily stays within a few blocks (the block, its shard being written,
    Wanda's temporaries; one run on a loaded machine measured 3.2, so the bound leaves room); loaded whole it
    holds all eight and more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shearkit.eval.memory import measure_in_child

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    d = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    whole_b, stem_b, block_b = weight_bytes(d, torch.float32)
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for lazy in (False, True):
        m = measure_in_child(_prune_and_save, str(d), str(tmp_path / f"out-{lazy}"), calib, lazy, setup=_imports)
        peaks[lazy] = m.anon_peak_above("loaded")  # above the interpreter with every library imported
    assert peaks[False] > whole_b  # the whole model (and its pruned copy's buffers) in memory
    assert peaks[True] < stem_b + 5 * block_b, (peaks, stem_b, block_b)
    assert peaks[True] < peaks[False] / 2


def _imports():
    """The libraries the work uses, imported before it is measured (their code is not the model)."""
    import tokenizers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import shearkit.io.lazy  # noqa: F401
    import shearkit.io.save  # noqa: F401
    import shearkit.methods.wanda  # noqa: F401


def _prune_and_save(_, src: str, out: str, calib, lazy: bool):
    import shearkit
    from shearkit.io.save import save

    model, _ = shearkit.load(src, device="cpu", dtype="float32", lazy=lazy)
    plan = shearkit.prune(model, None, "wanda", 0.5, calib=calib)
    save(model, None, out, plan=plan)
    return plan.ratio_achieved


def test_folders_lazy_loading_cannot_take_are_refused(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    from shearkit.io.modeling import SHARED_BLOCKS_KEY

    d = saved(tmp_path, "llama", tokenizer=tiny_tokenizer)
    cfg = json.loads((d / "config.json").read_text())
    shared = tmp_path / "shared"
    shutil.copytree(d, shared)
    (shared / "config.json").write_text(json.dumps({**cfg, SHARED_BLOCKS_KEY: {"1": 0}}))
    with pytest.raises(ShearkitError, match="compressed or per-layer / shared-block model; lazy loading"):
        load_lazy(shared)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(d / "config.json", empty / "config.json")
    with pytest.raises(ShearkitError, match="holds no .safetensors weights; lazy loading reads"):
        load_lazy(empty)
    state = load_file(str(d / "model.safetensors"))
    for drop, match in (("model.norm.weight", "lacks weights the model needs .*model.norm.weight"),
                        ("model.layers.1.mlp.up_proj.weight", "lacks weights of block model.layers.1 .*mlp.up_proj")):
        bad = tmp_path / drop
        shutil.copytree(d, bad)
        save_file({k: v for k, v in state.items() if k != drop}, str(bad / "model.safetensors"))
        with pytest.raises(ShearkitError, match=match):
            load_lazy(bad)


def test_knowledge_distribution_and_block_scores_are_the_same_block_by_block(tmp_path):
    """`shearkit analyze --lazy`: each trial's block in memory, masked and restored; ShortGPT's
    perplexity-drop scores through whole-model forwards that load each block in turn."""
    from shearkit.analysis import analyze

    d = saved(tmp_path, "llama")
    held = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    whole, lazy = make_tiny("llama"), load_lazy(d)
    rec_w = analyze(whole, None, 0.25, heldout=held, progress=False)
    rec_l = analyze(lazy, None, 0.25, heldout=held, progress=False)
    assert rec_l["dense_ppl"] == rec_w["dense_ppl"]
    assert [r["ppl"] for r in rec_l["nodes"]] == [r["ppl"] for r in rec_w["nodes"]]
    assert rec_l["unprunable"] == rec_w["unprunable"] and rec_l["layer_ratios"] == rec_w["layer_ratios"]
    assert block_is_on_disk(lazy)
    assert torch.equal(lazy(input_ids=held).logits, whole(input_ids=held).logits)  # every trial undone
    with pytest.raises(ShearkitError, match="The taylor proxy .* needs the whole model"):
        analyze(lazy, None, 0.25, heldout=held, calib_windows=held, proxy="taylor", progress=False)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    p_w = shearkit.prune(make_tiny("llama"), None, "shortgpt", blocks=1, calib=calib, importance="ppl", ppl_samples=2)
    p_l = shearkit.prune(load_lazy(d), None, "shortgpt", blocks=1, calib=calib, importance="ppl", ppl_samples=2)
    assert p_l.extra == p_w.extra and p_l.layers == p_w.layers


def test_zero_shot_of_a_lazy_model_equals_the_whole_model(tmp_path, tiny_tokenizer, monkeypatch):
    from shearkit.eval import zeroshot as zs

    from test_zeroshot import FILES

    for rel, rows in FILES.items():
        p = tmp_path / "tasks" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for v in ("SHEARKIT_DATA", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    d = saved(tmp_path, "llama")
    a = zs.zeroshot(make_tiny("llama"), tiny_tokenizer, "piqa,arc_easy", data_dir=tmp_path / "tasks")
    b = zs.zeroshot(load_lazy(d), tiny_tokenizer, "piqa,arc_easy", data_dir=tmp_path / "tasks")
    assert a == b


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_lazy_prune_resumes_from_its_block_checkpoints(tmp_path, method):
    """The blockwise checkpoints of a lazy run are re-applied block by block on --resume (masks, and
    SparseGPT's updated weights) to the same model."""
    d = saved(tmp_path, "llama")
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    first = load_lazy(d)
    p1 = shearkit.prune(first, None, method, 0.5, calib=calib, run_dir=run)
    again = load_lazy(d)
    p2 = shearkit.prune(again, None, method, 0.5, calib=calib, run_dir=run, resume=True)
    assert p2.layers == p1.layers and all(torch.equal(p1.masks[k], p2.masks[k]) for k in p1.masks)
    ids = torch.randint(0, 300, (2, 24))
    assert torch.equal(first(input_ids=ids).logits, again(input_ids=ids).logits)
