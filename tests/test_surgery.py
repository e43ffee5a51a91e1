"""Surgery: slicing a plan gives the same outputs as masking it, for every family, LoRA included."""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shearkit as sk
from shearkit.errors import ShearkitError
from shearkit.graph import base_block_params, layer_geometry, ratio_removed, removal_map
from shearkit.plan import Plan
from shearkit.surgery import apply_structured, mask_structured

from conftest import FAMILIES, make_tiny

TOL = dict(rtol=1e-4, atol=1e-5)  # float32; sliced and masked matmuls sum in different orders
_MODELS = {f: make_tiny(f) for f in FAMILIES}


def _ids(n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (n, t), generator=g)


def _sliced_and_masked(model, plan):
    a = apply_structured(copy.deepcopy(model), plan)
    b = mask_structured(copy.deepcopy(model), plan)
    return a, b


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_through_the_api_changes_nothing(family):
    model = make_tiny(family)
    ref = model(_ids()).logits
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    plan = sk.prune(model, None, "structured-magnitude", 0.0)
    assert plan.layers == {} and plan.ratio_achieved == 0.0
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    torch.testing.assert_close(model(_ids()).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_equals_masked_fixed_plan(family):
    model = _MODELS[family]
    geo = layer_geometry(model)
    g = geo[0]["heads"] // geo[0]["kv_heads"]
    layers = {"0": {"kv_groups": [0], "mlp_channels": [1, 5, 40]}, "1": {"mlp_channels": list(range(0, 60, 3))}}
    if g > 1:
        layers["1"]["heads"] = [h * g for h in range(geo[1]["kv_heads"])]  # first query head of each KV head
    plan = Plan("test", "structured", 0.1, layers=layers, blocks=[len(geo) - 1])
    a, b = _sliced_and_masked(model, plan)
    torch.testing.assert_close(a(_ids()).logits, b(_ids()).logits, **TOL)
    ga = a.get_submodule("model.layers.0.self_attn" if family not in ("opt", "gpt2") else
                         {"opt": "model.decoder.layers.0.self_attn", "gpt2": "transformer.h.0.attn"}[family])
    if hasattr(ga, "num_key_value_groups"):
        assert ga.num_key_value_groups == g  # one whole KV group removed: ratio unchanged
    assert a.config.num_hidden_layers == len(geo) - 1


@st.composite
def _random_plan(draw, geo):
    n = len(geo)
    blocks = draw(st.lists(st.integers(0, n - 1), max_size=n - 1, unique=True))
    layers = {}
    for i, gm in enumerate(geo):
        nh, nkv, w = gm["heads"], gm["kv_heads"], gm["mlp"]
        g = nh // nkv
        kv = draw(st.lists(st.integers(0, nkv - 1), max_size=nkv - 1, unique=True))
        keep_per = draw(st.integers(1, g))
        heads = []
        for k in range(nkv):
            if k in kv:
                continue
            drop = draw(st.permutations(range(g)))[: g - keep_per]
            heads += [k * g + h for h in drop]
        mlp = draw(st.lists(st.integers(0, w - 1), max_size=w - 1, unique=True))
        layers[str(i)] = {"heads": heads, "kv_groups": kv, "mlp_channels": mlp}
    return Plan("random", "structured", 0.0, layers=layers, blocks=blocks)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_plans_sliced_equals_masked(family, data):
    model = _MODELS[family]
    plan = data.draw(_random_plan(layer_geometry(model)))
    a, b = _sliced_and_masked(model, plan)
    ids = _ids(2, 10, seed=data.draw(st.integers(0, 100)))
    torch.testing.assert_close(a(ids).logits, b(ids).logits, **TOL)
    # the parameter count that was predicted is the one that results
    ratio, _ = ratio_removed(model, removal_map(model, plan), plan.blocks)
    before = base_block_params(model)
    assert base_block_params(a) == round(before * (1 - ratio))
    # config and modules agree: either plain keys that rebuild these shapes, or per-layer shapes
    from shearkit.surgery.sync import builds_same, layer_shapes

    if hasattr(a.config, "shearkit_layer_shapes"):
        assert a.config.shearkit_layer_shapes == layer_shapes(a)
    else:
        assert builds_same(a, a.config)
    assert a.config.num_hidden_layers == len(layer_geometry(model)) - len(plan.blocks)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache_after_slicing(family):
    model = _MODELS[family]
    plan = Plan("t", "structured", 0.1, layers={"0": {"kv_groups": [1], "mlp_channels": list(range(20))}}, blocks=[1])
    a, b = _sliced_and_masked(model, plan)
    prompt = _ids(1, 6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = a.generate(prompt, use_cache=True, **kw)
    uncached = a.generate(prompt, use_cache=False, **kw)
    masked = b.generate(prompt, use_cache=True, **kw)
    assert cached.shape == (1, 14)
    assert cached.tolist() == uncached.tolist() == masked.tolist()


def test_per_layer_widths_are_recorded_in_the_config():
    model = copy.deepcopy(_MODELS["llama"])
    apply_structured(model, Plan("t", "structured", 0.1, layers={"1": {"mlp_channels": [0, 1]}}))
    shapes = model.config.shearkit_layer_shapes["layers"]
    assert shapes[1]["modules"]["mlp.down_proj"] == [64, 94]
    assert shapes[0]["modules"]["mlp.down_proj"] == [64, 96]
    uni = copy.deepcopy(_MODELS["llama"])
    apply_structured(uni, Plan("t", "structured", 0.1, layers={str(i): {"kv_groups": [0], "mlp_channels": [3]}
                                                               for i in range(3)}))
    assert not hasattr(uni.config, "shearkit_layer_shapes")
    assert (uni.config.num_attention_heads, uni.config.num_key_value_heads, uni.config.intermediate_size) == (2, 1, 95)
    assert uni.config.head_dim == 16


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_peft_model_pruned_mid_training(family):
    """LoRA factors are sliced with their layers; sliced == masked and training continues."""
    from test_graph import _lora

    model = _lora(make_tiny(family))
    plan = Plan("t", "structured", 0.1, layers={"0": {"kv_groups": [1], "mlp_channels": list(range(8))}})
    a, b = _sliced_and_masked(model, plan)
    ids = _ids()
    torch.testing.assert_close(a(ids).logits, b(ids).logits, **TOL)
    inner = a.get_base_model()
    mods = {n: m for n, m in inner.named_modules() if n.endswith("layers.0.mlp.down_proj") or n.endswith("h.0.mlp.c_proj")}
    (down,) = mods.values()
    assert down.lora_A["default"].weight.shape[1] == 88 and down.in_features == 88
    a.train()
    loss = a(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in a.named_parameters() if p.requires_grad)


def test_plan_for_another_model_is_refused():
    model = make_tiny("llama")
    plan = sk.prune(copy.deepcopy(model), None, "structured-magnitude", 0.2, dry_run=True)
    other = make_tiny("llama", seed=1)
    with pytest.raises(ShearkitError, match="fingerprint"):
        sk.apply_plan(other, plan)
    sk.apply_plan(model, plan)  # the right base accepts it


def test_bad_plans_fail_before_anything_changes():
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layers, msg in [({"0": {"heads": [0]}}, "unequal"), ({"0": {"mlp_channels": [500]}}, "out of range"),
                        ({"0": {"kv_groups": [0, 1]}}, "every attention head"), ({"0": {"rows": [1]}}, "unknown")]:
        with pytest.raises(ShearkitError, match=msg):
            apply_structured(model, Plan("t", "structured", 0.1, layers=layers))
    with pytest.raises(ShearkitError, match="every block"):
        apply_structured(model, Plan("t", "structured", 0.1, blocks=[0, 1, 2]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_family_without_adapter():
    import transformers

    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    with pytest.raises(ShearkitError, match="not supported"):
        apply_structured(transformers.BertForMaskedLM(cfg), Plan("t", "structured", 0.1))


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_hidden_channels_sliced_across_the_network(family, tmp_path):
    """Hidden-channel removal reshapes every reader and writer of the residual stream and the
    config (masking is not equivalent here: a norm's statistics change with the width)."""
    from transformers import AutoModelForCausalLM

    from shearkit.io.save import save

    model = make_tiny(family)
    heads = model.config.num_attention_heads
    d = model.config.hidden_size
    a = apply_structured(copy.deepcopy(model), Plan("t", "structured", 0.1, hidden_channels=list(range(heads))))
    assert a.config.hidden_size == d - heads
    assert a.get_input_embeddings().weight.shape[1] == d - heads == a.lm_head.weight.shape[1]
    assert (a.lm_head.weight is a.get_input_embeddings().weight) == (family == "llama_tied")
    ids = _ids()
    out = save(a, None, tmp_path / "m")
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, a(ids).logits, rtol=0, atol=0)
    with pytest.raises(ShearkitError, match="multiple of num_attention_heads"):
        apply_structured(copy.deepcopy(model), Plan("t", "structured", 0.1, hidden_channels=[0]))
    with pytest.raises(ShearkitError, match="llama family only"):
        apply_structured(make_tiny("gpt2"), Plan("t", "structured", 0.1, hidden_channels=[0]))
