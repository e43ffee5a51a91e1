"""FlexiGPT (methods/flexigpt.py), its base selection (importance/shared_base.py) and shared blocks
(surgery/shared_block.py, io/remote_code.py): the distance against the paper's formula computed
by hand, the SVD init at the Eckart-Young optimum, one storage in memory and on disk, reloads to
the same logits, cached decoding, what trains, and what is refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import shearkit
from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.importance.shared_base import choose_bases, lowrank_distance, truncated_svd
from shearkit.io.remote_code import OutputNorm, SharedLinear
from shearkit.methods.flexigpt import default_rank
from shearkit.surgery.shared_block import share_block, shared_parameters, train_only_shared_parts

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
PROBE = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
PATHS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


def _logits(model, ids=PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights(model, i: int) -> dict[str, torch.Tensor]:
    blk = get_adapter(model).layers[i]
    return {p: blk.get_submodule(p).weight.detach().double() for p in PATHS}


def _best_rank(w: torch.Tensor, r: int) -> torch.Tensor:
    """The rank-r truncated SVD of w, by hand (float64)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def _paper_distance(wi: torch.Tensor, wj: torch.Tensor, r: int) -> float:
    """|| Ŵ_i - (Ŵ_j + Δ_ij) ||_F with Δ_ij the rank-r truncation of Ŵ_i - Ŵ_j, literally."""
    hi, hj = _best_rank(wi, r), _best_rank(wj, r)
    return float(torch.linalg.matrix_norm(hi - (hj + _best_rank(hi - hj, r))))


def test_lowrank_distance_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    for out_f, in_f, r in [(12, 9, 3), (7, 16, 2), (10, 10, 5), (6, 8, 6)]:
        wi, wj = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, in_f, generator=g)
        want = _paper_distance(wi, wj, r)
        got = lowrank_distance(truncated_svd(wi, r), truncated_svd(wj, r), r)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (out_f, in_f, r)
        if r >= min(out_f, in_f):
            assert got == pytest.approx(0.0, abs=1e-4)  # a full-rank adapter absorbs everything
        else:
            assert got > 0.1
    w = torch.randn(9, 7, generator=g)
    assert lowrank_distance(truncated_svd(w, 3), truncated_svd(w, 3), 3) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("select", ["lowrank", "plain"])
def test_base_selection_sums_the_projection_distances(select):
    model = make_tiny("llama")
    r = 4
    bases, dist = choose_bases(model, [1], r, select)
    w = {b: _weights(model, b) for b in range(3)}
    for j in (0, 2):
        if select == "lowrank":
            want = sum(_paper_distance(w[1][p], w[j][p], r) for p in PATHS)
        else:
            want = sum(float(torch.linalg.matrix_norm(w[1][p] - w[j][p])) for p in PATHS)
        assert dist[1][j] == pytest.approx(want, rel=1e-4)
    assert set(dist[1]) == {0, 2} and bases == {1: min((0, 2), key=lambda j: dist[1][j])}


def test_svd_init_reaches_the_optimal_error_of_its_rank():
    dense = make_tiny("mistral")
    model = copy.deepcopy(dense)
    r = 5
    share_block(model, 0, 2, r, output_norm=False)
    wi, wj = _weights(dense, 0), _weights(dense, 2)
    blk = get_adapter(model).layers[0]
    for p in PATHS:
        layer = blk.get_submodule(p)
        approx = wj[p] + (layer.adapter_b.double() @ layer.adapter_a.double()).detach()
        err2 = float(torch.linalg.matrix_norm(wi[p] - approx) ** 2)
        s = torch.linalg.svdvals(wi[p] - wj[p])
        assert err2 == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4), p  # Eckart-Young: the discarded energy
        assert err2 < float((s ** 2).sum())  # and the adapter did absorb something


def test_full_rank_svd_init_reproduces_the_pruned_block():
    """With every projection at full rank and no output norm, the replacement computes the pruned
    block again: the model's logits stay those of the original (float32 round-off only)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(dense)
    shearkit.prune(model, None, "flexigpt", calib=CALIB, blocks=1, rank=32, output_norm=False, training=False)
    torch.testing.assert_close(_logits(model), _logits(dense), atol=1e-4, rtol=0)
    low = copy.deepcopy(dense)  # a lower rank does not reproduce it
    shearkit.prune(low, None, "flexigpt", calib=CALIB, blocks=1, rank=4, output_norm=False, training=False)
    assert (_logits(low) - _logits(dense)).abs().max() > 1e-3


def test_output_norm_is_mean_centring_with_a_learnable_scale():
    norm = OutputNorm(6, init=0.05)
    h = torch.randn(3, 4, 6, dtype=torch.float64) * 3 + 1
    want = 0.05 * (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(h), want, atol=1e-6, rtol=1e-5)
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "flexigpt", calib=CALIB, blocks=1, norm_init=0.03, training=False)
    blk = get_adapter(model).layers[int(next(iter(plan.replaced)))]
    assert isinstance(blk.self_attn.o_proj.out_norm, OutputNorm) and isinstance(blk.mlp.down_proj.out_norm, OutputNorm)
    assert blk.self_attn.q_proj.out_norm is None and blk.mlp.up_proj.out_norm is None  # outputs only
    assert torch.all(blk.mlp.down_proj.out_norm.weight == 0.03)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_weights_are_one_tensor_in_memory_and_on_disk(family, tmp_path, tiny_tokenizer):
    from safetensors import safe_open

    dense = make_tiny(family)
    model = copy.deepcopy(dense)
    plan = shearkit.prune(model, tiny_tokenizer, "flexigpt", calib=CALIB, blocks=1, rank=3, training=False)
    (i, j), = ((int(k), v) for k, v in plan.replaced.items())
    assert plan.kind == "blocks" and plan.blocks == [] and plan.extra["replacements"][0]["base"] == j
    own, base = get_adapter(model).layers[i], get_adapter(model).layers[j]
    for p in PATHS:
        assert isinstance(own.get_submodule(p), SharedLinear)
        assert own.get_submodule(p).weight is base.get_submodule(p).weight  # the same Parameter
        assert own.get_submodule(p).weight.data_ptr() == base.get_submodule(p).weight.data_ptr()
    # counted once: the replaced block holds only its adapters, output norms and input norms
    hidden = model.config.hidden_size
    extra = sum(3 * (own.get_submodule(p).in_features + own.get_submodule(p).out_features) for p in PATHS)
    block_i = sum(p.numel() for p in get_adapter(dense).layers[i].parameters())
    counts = get_adapter(model).param_counts()
    assert counts["total"] == counts["unique"]
    assert counts["blocks"] == get_adapter(dense).param_counts()["blocks"] - block_i + extra + 2 * hidden + 2 * hidden
    assert plan.ratio_achieved == pytest.approx(1 - counts["blocks"] / get_adapter(dense).block_param_count())
    out = shearkit.save(model, tiny_tokenizer, tmp_path / "m", plan=plan)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    prefix = f"model.layers.{i}."
    own_keys = sorted(k[len(prefix):] for k in keys if k.startswith(prefix))
    assert all(k.endswith(("adapter_a", "adapter_b", "out_norm.weight", "layernorm.weight")) for k in own_keys)
    assert f"model.layers.{j}.self_attn.q_proj.weight" in keys
    assert sum(1 for k in keys if k.endswith("q_proj.weight")) == 2  # three blocks, two stored q weights
    prov = json.loads((out / "shearkit.json").read_text())
    assert prov["export"] == "shared-blocks" and prov["params"]["unique"] == counts["unique"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_reload_gives_identical_logits_and_cached_decoding(family, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_tiny(family)
    plan = shearkit.prune(model, tiny_tokenizer, "flexigpt", calib=CALIB, blocks=1, rank=4, training=False)
    with torch.no_grad():  # make the adapters and norms matter (as after training)
        for prm in shared_parameters(model).values():
            prm.add_(torch.randn_like(prm) * 0.05)
    want = _logits(model)
    out = shearkit.save(model, tiny_tokenizer, tmp_path / "m", plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] and "shearkit_shared_blocks" in config and "shearkit_layer_shapes" not in config
    loaded, _ = shearkit.load(out, device="cpu", dtype="float32")
    remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    (i, j), = ((int(k), v) for k, v in plan.replaced.items())
    for m in (loaded, remote):
        assert torch.equal(_logits(m), want)
        layers = get_adapter(m).layers
        assert layers[i].mlp.up_proj.weight.data_ptr() == layers[j].mlp.up_proj.weight.data_ptr()
        with torch.no_grad():
            cached = m.generate(PROBE[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
            plain = m.generate(PROBE[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(cached, plain)
    assert get_adapter(loaded).param_counts() == get_adapter(model).param_counts()


def test_per_layer_widths_and_shared_blocks_compose(tmp_path, tiny_tokenizer):
    """A model with per-layer widths and a shared block saves one modeling file that rebuilds both."""
    from transformers import AutoModelForCausalLM

    from shearkit.plan import Plan
    from shearkit.surgery import apply_structured

    model = make_tiny("llama")
    apply_structured(model, Plan(method="hand", kind="structured", ratio_target=0.0,
                                 layers={"0": {"mlp_channels": list(range(0, 96, 3))}}))
    with pytest.raises(ShearkitError, match="differ in shape from block 0"):
        share_block(model, 1, 0, 4)
    share_block(model, 2, 1, 4)
    want = _logits(model)
    out = shearkit.save(model, tiny_tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert "shearkit_layer_shapes" in config and "shearkit_shared_blocks" in config
    assert json.loads((out / "shearkit.json").read_text())["export"] == "per-layer+shared-blocks"
    for m in (shearkit.load(out, device="cpu", dtype="float32")[0],
              AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()):
        assert torch.equal(_logits(m), want)
        assert get_adapter(m).layers[0].mlp.down_proj.weight.shape == (64, 64)


def test_only_adapters_and_norm_scales_get_gradients():
    model = make_tiny("llama")
    share_block(model, 1, 0, 4)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with train_only_shared_parts(model) as trainable:
        model(input_ids=PROBE, labels=PROBE).loss.backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(trainable) and trainable
    assert all(n.startswith("model.layers.1.") and n.endswith(("adapter_a", "adapter_b", "out_norm.weight"))
               for n in got)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # restored


def test_training_changes_only_adapters_and_scales(tmp_path, text_file, tiny_tokenizer):
    dense = make_tiny("llama")
    model = copy.deepcopy(dense)
    train = {"steps": 3, "data": str(text_file), "seqlen": 16, "batch_size": 2, "lr": 1e-2,
             "loss_chunk": 8}  # the chunked output head (a plain model, not peft) trains the same parts
    plan = shearkit.prune(model, tiny_tokenizer, "flexigpt", calib=CALIB, blocks=1, rank=4, train=train,
                          run_dir=tmp_path / "run")
    assert plan.extra["train"]["steps_done"] == 3 and (tmp_path / "run" / "flexigpt" / "train_log.jsonl").is_file()
    i = int(next(iter(plan.replaced)))
    frozen = {k: v for k, v in dense.state_dict().items() if not k.startswith(f"model.layers.{i}.")
              or "layernorm" in k}
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # shared, kept and other weights untouched
    fresh = copy.deepcopy(dense)
    shearkit.prune(fresh, None, "flexigpt", calib=CALIB, blocks=1, rank=4, training=False)
    moved = [k for k, v in fresh.state_dict().items() if k.startswith(f"model.layers.{i}.")
             and not torch.equal(v, now[k])]
    assert moved and all(k.endswith(("adapter_a", "adapter_b", "out_norm.weight")) for k in moved)


def test_command_line_end_to_end(tiny_model_dir, tmp_path, text_file):
    from shearkit.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "--method", "flexigpt", "--blocks", "1",
                                 "--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "16",
                                 "--set", "prune.rank=4", "--set", f"prune.train.data={text_file}",
                                 "--set", "prune.train.steps=2", "--set", "prune.train.seqlen=16",
                                 "--set", "prune.train.batch_size=2", "--tasks", str(text_file),
                                 "--eval-seqlen", "16", "--limit", "1", "--no-dense-eval", "--out", str(out)])
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "flexigpt" and plan["blocks"] == [] and len(plan["replaced"]) == 1
    assert plan["extra"]["train"]["steps_done"] == 2 and plan["extra"]["rank"] == 4
    assert (out / "model" / "modeling_shearkit.py").is_file()
    model, _ = shearkit.load(out / "model", device="cpu", dtype="float32")
    assert get_adapter(model).num_layers == 3 and model.config.num_hidden_layers == 3  # same depth
    i = int(next(iter(plan["replaced"])))
    assert isinstance(get_adapter(model).layers[i].self_attn.q_proj, SharedLinear)
    from shearkit.report import write_report

    md = (write_report(out) / "report.md").read_text()
    assert f"| {i} | replaced by {plan['replaced'][str(i)]} |" in md


def test_flops_keep_the_compute_and_add_the_adapters():
    from shearkit.eval.flops import forward_flops_per_token

    dense = make_tiny("llama")
    model = copy.deepcopy(dense)
    share_block(model, 1, 0, 4)
    extra = 2 * 4 * sum(model.model.layers[1].get_submodule(p).in_features
                        + model.model.layers[1].get_submodule(p).out_features for p in PATHS)
    want = forward_flops_per_token(dense, 16)["total"] + extra
    assert forward_flops_per_token(model, 16)["total"] == want


def test_default_rank_scales_the_papers():
    assert default_rank(4096) == 256 and default_rank(576) == 32 and default_rank(64) == 4 and default_rank(8) == 1


def test_bad_input_is_refused(tiny_tokenizer):
    with pytest.raises(ShearkitError, match="prune.blocks=3 selects 3 of the model's 3 blocks"):
        shearkit.prune(make_tiny("llama"), None, "flexigpt", calib=CALIB, blocks=3, training=False)
    with pytest.raises(ShearkitError, match=r"prune.rank=33 exceeds .*self_attn.k_proj \(32x64\).*prune.rank <= 32"):
        shearkit.prune(make_tiny("llama"), None, "flexigpt", calib=CALIB, blocks=1, rank=33, training=False)
    with pytest.raises(ShearkitError, match="does not support the opt family.*supports: llama"):
        shearkit.prune(make_tiny("opt"), None, "flexigpt", calib=CALIB, blocks=1)
    with pytest.raises(ShearkitError, match="built for the llama family"):
        share_block(make_tiny("gpt2"), 1, 0, 2)
    with pytest.raises(ShearkitError, match="prune.select must be one of lowrank, plain"):
        shearkit.prune(make_tiny("llama"), None, "flexigpt", calib=CALIB, select="cosine")
    with pytest.raises(ShearkitError, match="prune.init must be one of svd, lora"):
        shearkit.prune(make_tiny("llama"), None, "flexigpt", calib=CALIB, init="zeros")
    with pytest.raises(ShearkitError, match="prune.train.rank does not apply"):
        shearkit.prune(make_tiny("llama"), None, "flexigpt", calib=CALIB, train={"rank": 4})
    plan = shearkit.prune(make_tiny("llama"), None, "flexigpt", calib=CALIB, blocks=1, training=False)
    with pytest.raises(ShearkitError, match="Load the model that run saved"):
        shearkit.apply_plan(make_tiny("llama"), plan, check=False)
    shared = make_tiny("llama")
    share_block(shared, 1, 0, 2)
    with pytest.raises(ShearkitError, match="already a shared copy"):
        share_block(shared, 2, 1, 2)
    with pytest.raises(ShearkitError, match="weight-shared blocks"):
        shearkit.prune(shared, None, "shortgpt", calib=CALIB, blocks=1)
    from shearkit.recovery.lora import lora_config

    with pytest.raises(ShearkitError, match="weight-shared blocks"):
        lora_config(shared, 8, 16, 0.0)


@pytest.mark.parametrize("init", ["svd", "lora"])
def test_ablations_build(init):
    """`init: lora` starts with B = 0 (the replaced block adds only the norm of its base's output);
    `select: plain` picks by the full-weight distance; both record what they did."""
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "flexigpt", calib=CALIB, blocks=1, rank=4, init=init, select="plain",
                          training=False)
    assert plan.config["init"] == init and plan.extra["select"] == "plain"
    blk = get_adapter(model).layers[int(next(iter(plan.replaced)))]
    b = blk.self_attn.q_proj.adapter_b
    assert bool((b == 0).all()) == (init == "lora") and bool((blk.self_attn.q_proj.adapter_a != 0).any())


def test_training_checkpoints_and_resumes_without_peft(tmp_path, text_file, tiny_tokenizer):
    """The shared Trainer checkpoints a plain model's adapters and norm scales, and a resumed run
    rebuilds the replacement and restores exactly the trained values."""
    train = {"steps": 4, "data": str(text_file), "seqlen": 16, "batch_size": 2, "lr": 1e-2, "save_every": 2}
    first = make_tiny("llama")
    shearkit.prune(first, tiny_tokenizer, "flexigpt", calib=CALIB, blocks=1, rank=4, train=train,
                   run_dir=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "flexigpt").glob("checkpoint-*")) == ["checkpoint-2",
                                                                                              "checkpoint-4"]
    import shutil

    shutil.rmtree(tmp_path / "run" / "flexigpt" / "checkpoint-4")  # resume mid-run, from step 2
    again = make_tiny("llama")
    plan = shearkit.prune(again, tiny_tokenizer, "flexigpt", calib=CALIB, blocks=1, rank=4, train=train,
                          run_dir=tmp_path / "run", resume=True)
    assert plan.extra["train"]["steps_done"] == 4 and plan.extra["train"]["resumed_from"] == 2
    want, got = shared_parameters(first), shared_parameters(again)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_smollm2_stores_nine_replaced_blocks_once(smollm, tmp_path):
    """The real model at the paper's 30%: 9 of 30 blocks replaced at the default rank 32; the
    weight file holds each tensor once (its size is the unique parameters' bytes plus a header)
    and reloads to the same logits."""
    dense, tok = smollm
    model = copy.deepcopy(dense)
    calib = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
    plan = shearkit.prune(model, tok, "flexigpt", 0.3, calib=calib, training=False)
    assert len(plan.replaced) == 9 and plan.extra["rank"] == 32 and model.config.num_hidden_layers == 30
    counts = get_adapter(model).param_counts()
    assert counts["unique"] < get_adapter(dense).param_counts()["unique"]
    out = shearkit.save(model, tok, tmp_path / "m", plan=plan)
    size = (out / "model.safetensors").stat().st_size
    assert 0 < size - 4 * counts["unique"] < 200_000  # float32, every tensor once; the JSON header is small
    loaded, _ = shearkit.load(out, device="cpu", dtype="float32")
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
