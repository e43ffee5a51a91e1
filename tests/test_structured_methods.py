"""structured-magnitude and llm-pruner: exact ratios, allocation, dense layers, errors, plan replay."""
import copy
import json

import pytest
import torch

import shearkit as sk
from shearkit.errors import ShearkitError
from shearkit.graph import base_block_params, layer_geometry
from shearkit.graph.summary import plan_summary, plan_table
from shearkit.methods import METHODS, get_method, method_config
from shearkit.methods.structured import end_layers

from conftest import FAMILIES, make_tiny

CALIB = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_magnitude_reaches_the_ratio_exactly_reported(family, allocation):
    model = make_tiny(family)
    before = base_block_params(model)
    plan = sk.prune(model, None, "structured-magnitude", 0.25, allocation=allocation)
    removed = 1 - base_block_params(model) / before
    assert plan.ratio_achieved == pytest.approx(removed, abs=1e-12)
    assert plan.ratio_achieved >= 0.25
    assert plan.kind == "structured" and plan.method == "structured-magnitude"
    model(CALIB)  # still runs


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_llm_pruner_runs_and_cuts(family):
    model = make_tiny(family)
    plan = sk.prune(model, None, "llm-pruner", 0.3, calib=CALIB)
    assert plan.ratio_achieved >= 0.3
    assert plan.extra["calib_tokens"] == CALIB.numel() and plan.extra["calib_loss"] > 0
    assert torch.isfinite(model(CALIB).logits).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llm_pruner_lean_gradient_pass_gives_the_same_scores_and_cuts(family):
    """Its gradient pass recomputes activations and chunks the output head by default (issue 16 item 2):
    the same Taylor statistics and the same plan as the pass that keeps everything."""
    from shearkit.importance import collect_stats

    model = make_tiny(family)
    full = collect_stats(model, CALIB, grads=True)
    lean = collect_stats(model, CALIB, grads=True, checkpointing=True, loss_chunk=5)
    assert full.grads.keys() == lean.grads.keys()
    for name in full.grads:
        torch.testing.assert_close(lean.grads[name], full.grads[name], rtol=1e-4, atol=1e-7)
    plans = [sk.prune(make_tiny(family), None, "llm-pruner", 0.3, calib=CALIB, dry_run=True, **kw).to_dict()
             for kw in ({"checkpointing": False, "loss_chunk": 0}, {"loss_chunk": 5}, {})]
    assert plans[0]["layers"] == plans[1]["layers"] == plans[2]["layers"]


def test_uniform_allocation_gives_equal_widths_and_rounding():
    model = make_tiny("llama")
    plan = sk.prune(model, None, "structured-magnitude", 0.2, allocation="uniform", round_to=8, attn_unit="none")
    widths = {g["mlp"] for g in layer_geometry(model)}
    assert len(widths) == 1 and widths.pop() % 8 == 0
    assert plan.extra["uniform_widths"] and not hasattr(model.config, "shearkit_layer_shapes")


def test_dense_layers_are_kept_and_llm_pruner_default():
    assert end_layers(30, None, None, default="llm-pruner") == [0, 1, 2, 3, 28, 29]
    assert end_layers(32, None, None, default="llm-pruner") == [0, 1, 2, 3, 30, 31]
    assert end_layers(3, None, None) == []
    model = make_tiny("llama")
    geo = layer_geometry(model)
    plan = sk.prune(model, None, "structured-magnitude", 0.15, dense_first=1, dense_last=1, attn_unit="none",
                    round_to=1)
    assert set(plan.layers) == {"1"}
    assert layer_geometry(model)[0] == geo[0] and layer_geometry(model)[2] == geo[2]
    assert not plan.extra["uniform_widths"]


def test_query_head_units_keep_equal_heads_per_kv_head():
    model = make_tiny("llama_tied")  # 6 query heads on 2 KV heads
    plan = sk.prune(model, None, "structured-magnitude", 0.3, attn_unit="query_heads", allocation="global")
    for g in layer_geometry(model):
        assert g["kv_heads"] == 2 and g["heads"] % 2 == 0
    assert any(e["heads"] and not e["kv_groups"] for e in plan.layers.values())


def test_global_allocation_takes_the_least_important_units_first():
    """Channels made worthless in one layer are the first taken by a small global prune."""
    model = make_tiny("llama")
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[:16].mul_(1e-4); mlp.up_proj.weight[:16].mul_(1e-4); mlp.down_proj.weight[:, :16].mul_(1e-4)
    plan = sk.prune(model, None, "structured-magnitude", 0.02, allocation="global", attn_unit="none", dry_run=True)
    assert list(plan.layers) == ["1"] and set(plan.layers["1"]["mlp_channels"]) <= set(range(16))


def test_unreachable_ratio_states_the_maximum():
    model = make_tiny("llama")
    with pytest.raises(ShearkitError, match=r"unreachable.*at most 0\.\d+"):
        sk.prune(model, None, "structured-magnitude", 0.95)
    with pytest.raises(ShearkitError, match="at most"):
        sk.prune(model, None, "structured-magnitude", 0.5, attn_unit="none", dense_first=2)
    with pytest.raises(ShearkitError, match=r"\[0, 1\)"):
        sk.prune(model, None, "structured-magnitude", 1.0)


def test_bad_options_are_named():
    with pytest.raises(ShearkitError, match="allocation"):
        method_config({"method": "llm-pruner", "allocation": "local"})
    with pytest.raises(ShearkitError, match="taylor"):
        method_config({"method": "llm-pruner", "taylor": "hessian"})
    with pytest.raises(ShearkitError, match="Did you mean 'round_to'"):
        method_config({"method": "structured-magnitude", "round_too": 8})


def test_dry_run_plan_round_trips_and_replays_on_a_fresh_base(tmp_path):
    model = make_tiny("qwen2")
    fresh = copy.deepcopy(model)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    plan = sk.prune(model, None, "llm-pruner", 0.3, calib=CALIB, dry_run=True, allocation="global")
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())  # dry run cuts nothing
    plan.save(tmp_path / "plan.json")
    loaded = sk.Plan.load(tmp_path / "plan.json")
    assert json.loads(json.dumps(loaded.to_dict())) == json.loads(json.dumps(plan.to_dict()))
    sk.apply_plan(model, loaded)
    sk.apply_plan(fresh, plan)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert 1 - base_block_params(model) / sum(p.numel() for p in make_tiny("qwen2").model.layers.parameters()) == \
        pytest.approx(plan.ratio_achieved)


def test_plan_table_and_summary():
    model = make_tiny("llama")
    plan = sk.prune(model, None, "structured-magnitude", 0.3, dense_first=1, dry_run=True)
    headers, rows = plan_table(plan)
    assert headers[:4] == ["layer", "heads", "kv heads", "mlp width"]
    assert rows[0][0] == "0 (dense)" and rows[0][1] == "4/4" and rows[0][4] == 0
    assert rows[-1][0] == "total" and rows[-1][4] == sum(plan.extra["params_removed"])
    s = plan_summary(plan)
    assert s["ratio_achieved"] == plan.ratio_achieved and "per-layer" in s["export"]


def test_methods_are_registered_without_importing_torch_modules():
    assert METHODS["llm-pruner"].kind == "structured" and METHODS["structured-magnitude"].kind == "structured"
    assert get_method("llm-pruner").needs_calibration and not get_method("structured-magnitude").needs_calibration


@pytest.mark.slow
def test_llm_pruner_on_smollm(smollm, data_dir):
    from shearkit.pruning import calib_tokens

    model, tok = smollm
    model = copy.deepcopy(model)
    dense = sk.evaluate(model, tok, ["wikitext2"], seqlen=512, limit=4, data_dir=data_dir)["wikitext2"]["ppl"]
    plan = sk.prune(model, tok, "llm-pruner", 0.2, calib=calib_tokens(tok, None, data_dir)[:8])
    assert plan.ratio_achieved == pytest.approx(0.2, abs=0.02)
    ppl = sk.evaluate(model, tok, ["wikitext2"], seqlen=512, limit=4, data_dir=data_dir)["wikitext2"]["ppl"]
    assert dense < ppl < 10 * dense


def test_llm_pruner_on_a_peft_model_mid_training():
    """A LoRA-wrapped model is scored with its base weights' gradients and cut with its factors;
    which parameters train is left as it was."""
    from test_graph import _lora

    model = _lora(make_tiny("llama"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    plan = sk.prune(model, None, "llm-pruner", 0.3, calib=CALIB)
    assert plan.ratio_achieved >= 0.3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    up = model.get_base_model().model.layers[1].mlp.up_proj
    assert up.lora_B["default"].weight.shape[0] == up.base_layer.weight.shape[0] < 96
    model(input_ids=CALIB, labels=CALIB).loss.backward()
