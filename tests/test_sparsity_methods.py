"""magnitude / wanda / sparsegpt / besa on tiny models of every family: exact sparsity, N:M
patterns, plans that round-trip and re-apply, BESA's exact budget, N:M refusal and resume."""
from __future__ import annotations

import copy

import pytest
import torch

import shearkit
from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.methods import get_method, method_config
from shearkit.plan import Plan
from shearkit.pruning import apply_plan
from shearkit.sparsity.apply import load_masks, masks_from_model, save_masks
from shearkit.sparsity.layers import block_linears
from shearkit.sparsity.plot import layer_sparsity_table, plot_layer_sparsity

from conftest import make_tiny

FAST_BESA = {"granularity": "layer", "epochs": 1}


def _calib(n=4, seqlen=16):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _zeros_by_layer(model):
    out = {}
    for v in get_adapter(model).blocks():
        for rel, ref in block_linears(v).items():
            out[(v.index, rel)] = (int((ref.weight == 0).sum()), ref.weight.numel(), ref.weight.detach().clone())
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_per_layer_sparsity(tiny_model, method):
    plan = shearkit.prune(tiny_model, None, method, 0.5, calib=_calib())
    assert plan.kind == "unstructured" and plan.method == method
    for (li, rel), (zeros, numel, _) in _zeros_by_layer(tiny_model).items():
        assert zeros == round(0.5 * numel), (li, rel)
        assert plan.layers[str(li)]["sparsity"][rel] == pytest.approx(zeros / numel)
        assert plan.layers[str(li)]["pattern"] == "unstructured"
    assert plan.ratio_achieved == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "4:8"])
def test_nm_pattern_every_group(method, nm):
    n, m = (int(x) for x in nm.split(":"))
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, method, calib=_calib(), nm=nm)
    assert plan.ratio_target == pytest.approx(n / m)
    for (li, rel), (_, _, w) in _zeros_by_layer(model).items():
        zeros_per_group = (w == 0).reshape(w.shape[0], -1, m).sum(-1)
        assert bool((zeros_per_group == n).all()), (li, rel)
        assert plan.layers[str(li)]["pattern"] == nm


def test_wanda_uses_pruned_upstream_activations():
    """Block 1's statistics come from block 0's pruned output, so a blockwise run differs
    from pruning every layer with statistics from the dense model."""
    dense_stats = make_tiny("llama")
    m = make_tiny("llama")
    shearkit.prune(m, None, "wanda", 0.7, calib=_calib())
    from shearkit.calibration import capture_inputs, walk_blocks
    from shearkit.calibration.stats import collect_input_stats
    from shearkit.sparsity.wanda import wanda_mask

    inputs = capture_inputs(dense_stats, _calib())
    walk_blocks(dense_stats, inputs, stop=2)  # dense outputs of blocks 0, 1
    v2 = get_adapter(dense_stats).block_view(2)
    q = v2.attn.q
    st = collect_input_stats(v2.module, {q.name: q.module}, inputs)[q.name]
    keep_dense_stats = wanda_mask(q.weight, st.col_norm, 0.7)
    keep_blockwise = get_adapter(m).block_view(2).attn.q.weight != 0
    assert not torch.equal(keep_dense_stats, keep_blockwise)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "besa"])
def test_plan_round_trip_and_reapply_from_masks(tmp_path, method):
    base = make_tiny("llama")
    model = copy.deepcopy(base)
    opts = FAST_BESA if method == "besa" else {}
    plan = shearkit.prune(model, None, method, 0.5, calib=_calib(), **opts)
    plan.save(tmp_path / "plan.json")
    assert set(plan.masks) == set(masks_from_model(model, plan))  # the run's masks equal the zeros
    assert all(torch.equal(plan.masks[k], v) for k, v in masks_from_model(model, plan).items())
    assert (tmp_path / "masks.safetensors").is_file()  # saved with the plan, beside plan.json
    plan2 = Plan.load(tmp_path)  # ... and loaded with it
    assert plan2.layers == plan.layers and plan2.base["fingerprint"] == plan.base["fingerprint"]
    apply_plan(base, plan2)
    for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    save_masks(plan.masks, tmp_path / "other")  # masks given explicitly still work
    base = make_tiny("llama")
    apply_plan(base, Plan.load(tmp_path), masks=load_masks(tmp_path / "other"))
    for (k, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_reapply_sparsegpt_masks_restores_zeros_not_weights(caplog):
    base = make_tiny("llama")
    model = copy.deepcopy(base)
    plan = shearkit.prune(model, None, "sparsegpt", 0.5, calib=_calib())
    with caplog.at_level("INFO", logger="shearkit.sparsity.apply"):
        apply_plan(base, plan)
    assert "updated the kept weights" in caplog.text
    ref = get_adapter(model).block_view(0).attn.q.weight
    got = get_adapter(base).block_view(0).attn.q.weight
    assert torch.equal(ref == 0, got == 0) and not torch.equal(ref, got)


def test_apply_plan_refuses_other_model_and_missing_masks():
    m = make_tiny("llama")
    plan = shearkit.prune(m, None, "magnitude", 0.5)
    with pytest.raises(ShearkitError, match="fingerprint"):
        apply_plan(make_tiny("llama", seed=1), plan, masks={})
    plan.masks = None  # a plan whose masks file is missing
    with pytest.raises(ShearkitError, match="carries no masks"):
        apply_plan(make_tiny("llama"), plan)


def test_dry_run_leaves_model_unchanged():
    m = make_tiny("llama")
    before = copy.deepcopy(m.state_dict())
    plan = shearkit.prune(m, None, "wanda", 0.5, calib=_calib(), dry_run=True)
    assert plan.ratio_achieved == pytest.approx(0.5)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_sparsity_alias_and_config_validation():
    cfg = method_config({"method": "wanda", "sparsity": 0.6})
    assert cfg.ratio == 0.6
    with pytest.raises(ShearkitError, match="--nm"):
        method_config({"method": "wanda", "nm": "3-4"})
    with pytest.raises(ShearkitError, match="blocksize"):
        method_config({"method": "sparsegpt", "blocksize": 0})
    assert get_method("sparsegpt").in_place and get_method("magnitude").needs_calibration is False


# -- BESA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,granularity", [(0.5, "row"), (0.7, "layer")])
def test_besa_hits_target_exactly_per_block(ratio, granularity):
    m = make_tiny("llama")
    plan = shearkit.prune(m, None, "besa", ratio, calib=_calib(), granularity=granularity, optimizer="adamw",
                          lr=0.05, epochs=2)
    zeros = _zeros_by_layer(m)
    for li in range(3):
        z = sum(v[0] for (i, _), v in zeros.items() if i == li)
        n = sum(v[1] for (i, _), v in zeros.items() if i == li)
        assert z == round(ratio * n)
    per_layer = [s for e in plan.layers.values() for s in e["sparsity"].values()]
    assert len(set(round(s, 4) for s in per_layer)) > 1  # non-uniform allocation
    assert plan.extra["besa"]["learned"]["0"] and plan.extra["optimizer"] == "adamw"


def test_besa_uses_prodigy_by_default():
    """Prodigy is a dependency, the paper's optimiser and the default ("auto" from older recipes
    means the same); nothing falls back silently to another optimiser."""
    plan = shearkit.prune(make_tiny("llama"), None, "besa", 0.5, calib=_calib(), **FAST_BESA)
    assert plan.extra["optimizer"] == "prodigy" and plan.config["optimizer"] == "prodigy"
    assert method_config({"method": "besa", "optimizer": "auto"}).optimizer == "prodigy"
    with pytest.raises(ShearkitError, match="prodigy or adamw"):
        method_config({"method": "besa", "optimizer": "sgd"})


def test_besa_refuses_nm_with_reason():
    with pytest.raises(ShearkitError, match="nothing to allocate"):
        method_config({"method": "besa", "nm": "2:4"})


def test_besa_resume_after_interruption(tmp_path):
    from shearkit.methods.besa import Besa

    calib = _calib()
    full = make_tiny("llama")
    plan_full = shearkit.prune(full, None, "besa", 0.6, calib=calib, **FAST_BESA)

    crashed = make_tiny("llama")
    orig = Besa.prune_block
    calls = []

    def crash_at_2(self, view, inputs):
        if view.index == 2:
            raise KeyboardInterrupt
        calls.append(view.index)
        return orig(self, view, inputs)

    Besa.prune_block = crash_at_2
    try:
        with pytest.raises(KeyboardInterrupt):
            shearkit.prune(crashed, None, "besa", 0.6, calib=calib, resume_dir=str(tmp_path), **FAST_BESA)
    finally:
        Besa.prune_block = orig
    assert calls == [0, 1] and (tmp_path / "block-0001.safetensors").exists()

    resumed = make_tiny("llama")  # a fresh copy of the base, as after a restart
    plan = shearkit.prune(resumed, None, "besa", 0.6, calib=calib, resume_dir=str(tmp_path), **FAST_BESA)
    assert plan.layers == plan_full.layers
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k

    with pytest.raises(ShearkitError, match="other config.ratio"):
        shearkit.prune(make_tiny("llama"), None, "besa", 0.5, calib=calib, resume_dir=str(tmp_path), **FAST_BESA)


def test_layer_sparsity_plot(tmp_path):
    m = make_tiny("llama")
    plan = shearkit.prune(m, None, "besa", 0.6, calib=_calib(), **FAST_BESA)
    table = layer_sparsity_table(plan)
    assert set(table) == set(block_linears(get_adapter(m).block_view(0))) and len(table["mlp.up_proj"]) == 3
    out = plot_layer_sparsity(plan, tmp_path / "sp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _assert_same_pruning(pa, a, pb, b):
    """Two runs chose the same masks and left the same weights (not only the same fractions)."""
    assert pa.layers == pb.layers and pa.ratio_achieved == pb.ratio_achieved
    assert set(pa.masks) == set(pb.masks) and len(pa.masks) == 3 * 7
    for name in pa.masks:
        assert torch.equal(pa.masks[name], pb.masks[name]), name
    for (k, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(wa, wb), k


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "besa"])
def test_offloaded_activations_give_the_same_result(method):
    """Keeping activations on the CPU moves data, nothing else: the same masks and the same
    weights as without offloading (same batches, so the same arithmetic). Here compute and
    storage are both the CPU; the CUDA test below streams blocks through a GPU."""
    a, b = make_tiny("llama"), make_tiny("llama")
    opts = FAST_BESA if method == "besa" else {}
    pa = shearkit.prune(a, None, method, 0.5, calib=_calib(), batch_size=2, **opts)
    pb = shearkit.prune(b, None, method, 0.5, calib=_calib(), offload_activations=True, batch_size=2, **opts)
    _assert_same_pruning(pa, a, pb, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "besa"])
def test_offloaded_activations_give_the_same_result_on_cuda(method):
    """Model on the CPU, blocks computed on CUDA: activations kept on the GPU or offloaded to
    the CPU give the same masks and weights, and the model comes back to the CPU."""
    a, b = make_tiny("llama"), make_tiny("llama")
    opts = FAST_BESA if method == "besa" else {}
    pa = shearkit.prune(a, None, method, 0.5, calib=_calib(), batch_size=2, device="cuda", **opts)
    pb = shearkit.prune(b, None, method, 0.5, calib=_calib(), batch_size=2, device="cuda",
                        offload_activations=True, **opts)
    assert {p.device.type for p in b.parameters()} == {"cpu"}
    _assert_same_pruning(pa, a, pb, b)


@pytest.mark.slow
def test_smollm_wanda_beats_magnitude_at_half_sparsity(data_dir):
    from shearkit.data import calibration_windows
    from shearkit.eval.perplexity import perplexity

    ppl = {}
    for method in ("magnitude", "wanda"):
        model, tok = shearkit.load("smollm2-135m", device="cpu", dtype="float32")
        calib = calibration_windows(tok, "c4", 8, 256, 0, data_dir)
        plan = shearkit.prune(model, tok, method, 0.5, calib=calib)
        assert plan.ratio_achieved == pytest.approx(0.5, abs=1e-6)
        ppl[method] = perplexity(model, tok, "wikitext2", seqlen=256, limit=4, data_dir=data_dir)["ppl"]
    assert ppl["wanda"] < ppl["magnitude"]
