"""Minimally removable structures over LoRA modules: zeroing a group's slices (base + LoRA) equals
removing it, the per-group counts match the tensors, and `shearkit graph` shows them."""
import copy
import json

import pytest
import torch

from shearkit.errors import ShearkitError
from shearkit.graph import describe_groups, kv_groups, mlp_channels, query_heads
from shearkit.plan import Plan
from shearkit.surgery import apply_structured
from shearkit.surgery.slicing import zero

from conftest import make_tiny
from test_cli import run_cli
from test_graph import _lora

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def _zero_groups(model, gs, rows, lora=True):
    sel = torch.tensor(rows)
    m = model.get_base_model()
    for p in gs.parts:
        if p.lora and not lora:
            continue
        zero(m.get_submodule(p.module), p.dim, p.index[sel].reshape(-1))


@pytest.mark.parametrize("kind, rows, entry", [
    ("kv_group", [1], {"kv_groups": [1]}),
    ("query_head", [0, 2], {"heads": [0, 2]}),  # the first query head of each KV head (GQA: 2 per KV head)
    ("mlp_channel", [3, 17, 40, 95], {"mlp_channels": [3, 17, 40, 95]}),
])
def test_zeroed_group_slices_equal_the_pruned_peft_model(kind, rows, entry):
    """Zero a group's base and LoRA slices == slice it out physically; the LoRA slices are needed."""
    model = _lora(make_tiny("llama"))  # init_lora_weights=False: B is not zero, LoRA changes the output
    build = {"kv_group": kv_groups, "query_head": query_heads, "mlp_channel": mlp_channels}[kind]
    gs = build(model, 1)
    assert any(p.lora for p in gs.parts)
    pruned = apply_structured(copy.deepcopy(model), Plan("t", "structured", 0.1, layers={"1": entry}))
    with torch.no_grad():
        want = pruned(IDS).logits
        masked = copy.deepcopy(model)
        _zero_groups(masked, gs, rows)
        torch.testing.assert_close(masked(IDS).logits, want, rtol=1e-4, atol=1e-5)
        base_only = copy.deepcopy(model)
        _zero_groups(base_only, gs, rows, lora=False)
        assert (base_only(IDS).logits - want).abs().max() > 1e-3  # the LoRA rows/columns must go too


def test_counts_match_the_tensors_and_lora_rank_matches_real_adapters():
    plain = make_tiny("llama")
    rows = describe_groups(plain, lora_rank=4, hidden=True, attn_unit="query_heads")
    real = describe_groups(_lora(make_tiny("llama"), r=4), hidden=True, attn_unit="query_heads")
    assert rows == real  # counted for rank-4 adapters == counted from the adapters peft attached
    for i, block in enumerate(plain.model.layers):
        kv, mlp = (next(r for r in rows if r["layer"] == i and r["kind"] == k) for k in ("kv_group", "mlp_channel"))
        norms = sum(p.numel() for n, p in block.named_parameters() if "norm" in n)
        assert kv["params"] + mlp["params"] + norms == sum(p.numel() for p in block.parameters())
        assert kv["params"] == kv["groups"] * kv["params_per_group"]
    lora = _lora(make_tiny("llama"), r=4)
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    # B rows of q/k/v/gate/up and A columns of o/down ride with a layer's groups, the rest with the
    # hidden channels: every LoRA entry belongs to exactly one group set (query heads are inside KV groups)
    assert sum(r["lora_params"] for r in real if r["kind"] != "query_head") == n_lora
    (hid,) = [r for r in rows if r["layer"] == "all"]
    assert hid["kind"] == "hidden_channel" and hid["groups"] == 64
    assert all(r["lora_params"] == 0 for r in describe_groups(plain))
    with pytest.raises(ShearkitError, match="already carries LoRA"):
        describe_groups(lora, lora_rank=8)


def test_graph_cli_table_json_and_plot(tiny_model_dir, tmp_path):
    png = tmp_path / "g.png"
    r = run_cli("graph", str(tiny_model_dir), "--lora-rank", "8", "--hidden", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert {x["kind"] for x in rec} == {"kv_group", "mlp_channel", "hidden_channel"}
    assert all(x["lora_params"] > 0 for x in rec)
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = run_cli("graph", str(tiny_model_dir), "--query-heads")
    assert r.returncode == 0, r.stderr
    assert "query_head" in r.stdout and "mlp_channel" in r.stdout and "params / group" in r.stdout
    r = run_cli("graph", str(tiny_model_dir), "--lora-rank", "0")
    assert r.returncode == 2 and "positive rank" in r.stderr
