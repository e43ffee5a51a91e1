"""Dependency groups: derived from the adapters, coupled correctly, LoRA factors included."""
import pytest
import torch

from shearkit.errors import ShearkitError
from shearkit.graph import (base_block_params, check_lora_shapes, hidden_channels, kv_groups, mlp_channels,
                            normalize_entry, query_heads, removal_map)
from shearkit.plan import Plan

from conftest import FAMILIES, make_tiny


def _lora(model, r=4):
    from peft import LoraConfig, get_peft_model

    targets = {"gpt2": ["c_attn", "c_proj", "c_fc"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=targets.get(model.config.model_type, "all-linear"),
                     fan_in_fan_out=model.config.model_type == "gpt2", init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_and_kv_groups_partition_their_tensors(family):
    """Every row/column of each coupled dimension belongs to exactly one group."""
    from collections import defaultdict

    from shearkit.arch.modules import module_shape

    model = make_tiny(family)
    for gs in (mlp_channels(model, 0), kv_groups(model, 0)):
        covered = defaultdict(list)
        for part in gs.parts:
            covered[(part.module, part.dim)] += part.index.reshape(-1).tolist()
        for (name, dim), idx in covered.items():
            size = module_shape(model.get_submodule(name))[dim]
            assert sorted(idx) == list(range(size)), (name, dim)
    mlp = mlp_channels(model, 0)
    mods = {p.module: model.get_submodule(p.module) for p in mlp.parts}
    in_bias = sum(mods[p.module].bias.numel() for p in mlp.parts if p.dim == 0 and mods[p.module].bias is not None)
    assert int(mlp.param_counts(model).sum()) == sum(m.weight.numel() for m in mods.values()) + in_bias


def test_kv_group_holds_the_query_heads_that_read_it():
    model = make_tiny("llama")  # 4 query heads, 2 KV heads, head_dim 16
    gs = kv_groups(model, 1)
    g = gs.group(1)
    q = next(s for s in g.slices if s.module.endswith("q_proj"))
    k = next(s for s in g.slices if s.module.endswith("k_proj"))
    o = next(s for s in g.slices if s.module.endswith("o_proj"))
    assert q.indices == tuple(range(32, 64)) and q.dim == 0  # query heads 2 and 3
    assert k.indices == tuple(range(16, 32))
    assert o.dim == 1 and o.indices == q.indices
    qh = query_heads(model, 1)
    assert len(qh) == 4 and len(gs) == 2
    assert {s.module.rsplit(".", 1)[1] for s in qh.group(0).slices} == {"q_proj", "o_proj"}


def test_gpt2_fused_qkv_offsets():
    model = make_tiny("gpt2")  # hidden 64, 4 heads of 16, c_attn rows q|k|v
    g = kv_groups(model, 0).group(2)
    rows = sorted(i for s in g.slices if s.module.endswith("c_attn") for i in s.indices)
    assert rows == list(range(32, 48)) + list(range(96, 112)) + list(range(160, 176))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_factors_ride_with_their_layers(family):
    model = _lora(make_tiny(family))
    gs = kv_groups(model, 0)
    lora = [p for p in gs.parts if p.lora]
    assert any(".lora_B." in p.module and p.dim == 0 for p in lora)
    assert any(".lora_A." in p.module and p.dim == 1 for p in lora)
    base = gs.base_parts()
    assert all(p.module.endswith(".base_layer") for p in base)
    # a B row index must address the same output feature as the base row it rides with
    q_base = next(p for p in base if "q_proj" in p.module or "c_attn" in p.module)
    q_b = next(p for p in lora if p.module.startswith(q_base.module.replace(".base_layer", ".lora_B")))
    assert torch.equal(q_base.index, q_b.index)


def test_lora_shape_mismatch_is_refused():
    model = _lora(make_tiny("llama"))
    inner = model.get_base_model().model.layers[0].self_attn.q_proj
    inner.lora_B["default"].weight = torch.nn.Parameter(torch.zeros(10, 4))
    with pytest.raises(ShearkitError, match="adapter 'default'.*q_proj"):
        check_lora_shapes(model)


def test_normalize_entry_closes_and_checks():
    geo = {"heads": 6, "kv_heads": 2, "head_dim": 8, "mlp": 16}
    e = normalize_entry(0, geo, {"kv_groups": [1]})
    assert e["heads"] == [3, 4, 5]
    e = normalize_entry(0, geo, {"heads": [0, 1, 2]})  # every query head of KV 0 -> KV 0 goes
    assert e["kv_groups"] == [0]
    assert normalize_entry(0, geo, {"heads": [0, 4]})["heads"] == [0, 4]
    with pytest.raises(ShearkitError, match="unequal"):
        normalize_entry(0, geo, {"heads": [0]})
    with pytest.raises(ShearkitError, match="every attention head"):
        normalize_entry(0, geo, {"kv_groups": [0, 1]})
    with pytest.raises(ShearkitError, match="out of range"):
        normalize_entry(0, geo, {"mlp_channels": [16]})
    with pytest.raises(ShearkitError, match="every MLP channel"):
        normalize_entry(0, geo, {"mlp_channels": list(range(16))})


def test_removal_map_refuses_a_plan_for_other_shapes():
    model = make_tiny("llama")
    with pytest.raises(ShearkitError, match="layers"):
        removal_map(model, Plan("x", "structured", 0.1, base={"num_layers": 7}))
    with pytest.raises(ShearkitError, match="layer 9"):
        removal_map(model, Plan("x", "structured", 0.1, layers={"9": {"mlp_channels": [0]}}))


def test_hidden_channels_cover_the_residual_stream():
    model = make_tiny("llama")
    hs = hidden_channels(model)
    assert len(hs) == 64
    names = {p.module for p in hs.parts}
    assert "model.embed_tokens" in names and "lm_head" in names and "model.norm" in names
    assert "model.layers.0.self_attn.o_proj" in names and "model.layers.2.mlp.up_proj" in names
    with pytest.raises(ShearkitError, match="llama family only"):
        hidden_channels(make_tiny("gpt2"))


def test_base_block_params_ignores_lora():
    plain = make_tiny("llama")
    assert base_block_params(_lora(make_tiny("llama"))) == base_block_params(plain)
    assert base_block_params(plain) == sum(p.numel() for p in plain.model.layers.parameters())
