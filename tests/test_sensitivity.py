"""Knowledge distribution (LoRAShear Alg. 3): reversible masking, gamma, targets that reach the
overall ratio, and the sensitivity file as a structured method's allocation."""
import json
import math

import pytest
import torch

import shearkit as sk
from shearkit.analysis import allocate, analyze, most_sensitive, node_removal, node_units, zeroed
from shearkit.analysis.targets import NodeUnits, block_params
from shearkit.errors import ShearkitError

from conftest import make_tiny
from test_cli import run_cli
from test_graph import _lora


@pytest.fixture
def heldout(tmp_path):
    p = tmp_path / "heldout.txt"
    p.write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i} times" for i in range(300)))
    return p


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_bit_for_bit(model, snap):
    now = dict(model.named_parameters())
    assert now.keys() == snap.keys()
    assert all(torch.equal(now[n], snap[n]) for n in snap)


def test_masking_context_restores_bit_for_bit_also_after_an_error():
    model = _lora(make_tiny("llama"))
    snap = _snapshot(model)
    rem = node_removal(model, 1, {"kv_groups": [0], "mlp_channels": [2, 7]})
    assert any(".lora_B." in name for name, _ in rem) and any(".lora_A." in name for name, _ in rem)
    with zeroed(model, rem):
        inner = model.get_base_model()
        assert not inner.model.layers[1].mlp.up_proj.base_layer.weight[[2, 7]].any()
        assert not inner.model.layers[1].mlp.down_proj.lora_A["default"].weight[:, [2, 7]].any()
        assert not all(torch.equal(p, snap[n]) for n, p in model.named_parameters())
    _assert_bit_for_bit(model, snap)
    with pytest.raises(RuntimeError, match="inside"):
        with zeroed(model, rem):
            raise RuntimeError("failure inside the trial")
    _assert_bit_for_bit(model, snap)


def test_gamma_marks_the_most_sensitive():
    dev = [0.1, 5.0, 0.3, 2.0, 0.0, 9.0, 0.2, 0.2, 1.0, 0.4]
    assert most_sensitive(dev, 0.2) == [1, 5]
    assert most_sensitive(dev, 0.25) == [1, 3, 5]  # ceil(2.5) = 3
    assert most_sensitive(dev, 0.0) == []
    with pytest.raises(ShearkitError, match="gamma"):
        most_sensitive(dev, 1.0)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.37, 0.45])
def test_targets_reach_the_ratio_within_one_unit(ratio):
    model = make_tiny("llama")
    nodes = node_units(model, round_to=8)
    total = block_params(model)
    keep = {0, 5}
    units = allocate(nodes, keep, ratio, total)
    assert units[0] == units[5] == 0
    removed = sum(sum(n.unit_costs[:u]) for n, u in zip(nodes, units))
    last = max(n.unit_costs[u - 1] for n, u in zip(nodes, units) if u)
    assert ratio * total <= removed < ratio * total + last


def test_targets_redistribute_what_kept_groups_cannot_give_and_refuse_the_impossible():
    # four structures of 100 parameters in units of 10 (at most 90 removable each)
    nodes = [NodeUnits(i // 2, "attn" if i % 2 == 0 else "mlp", 10, 100, [1] * 9, [10] * 9) for i in range(4)]
    units = allocate(nodes, {0}, 0.45, 400)  # 180 from the three others: 60 each
    assert units == [0, 6, 6, 6]
    units = allocate(nodes, {0, 1}, 0.45, 400)  # 90 + 90: both at their cap
    assert units == [0, 0, 9, 9]
    with pytest.raises(ShearkitError, match="unreachable"):
        allocate(nodes, {0, 1}, 0.46, 400)
    # equal remainders: the unit goes to the least sensitive node group, not the first one
    whole = [NodeUnits(i, "attn", 3, 300, [1, 1], [100, 100]) for i in range(3)]
    assert allocate(whole, set(), 0.2, 1000, sensitivity=[0.5, 0.1, 0.3]) == [0, 1, 1]
    assert allocate(whole, set(), 0.2, 1000) == [1, 1, 0]


def test_analyze_restores_the_model_and_its_file_drives_a_structured_prune(heldout, tiny_tokenizer, tmp_path):
    model = make_tiny("llama")
    snap = _snapshot(model)
    ratio = 0.3
    rec = analyze(model, tiny_tokenizer, ratio, windows=2, seqlen=32, dataset=str(heldout), gamma=0.34, progress=False)
    _assert_bit_for_bit(model, snap)
    nodes = rec["nodes"]
    assert len(nodes) == 6 and {n["kind"] for n in nodes} == {"attn", "mlp"}
    assert all(n["zeroed"] == n["units"] // 2 for n in nodes)
    kept = sorted(nodes, key=lambda n: -n["relative_deviation"])[: math.ceil(0.34 * 6)]
    assert {f"{n['layer']}.{n['kind']}" for n in kept} == set(rec["unprunable"])
    assert all(n["target_units"] == 0 for n in kept)
    assert ratio <= rec["ratio_reached"] < ratio + max(n.unit_costs[0] for n in node_units(model)) / rec["block_params"]
    path = tmp_path / "sens.json"
    path.write_text(json.dumps(rec))
    plan = sk.prune(model, None, "structured-magnitude", ratio, allocation=str(path), dry_run=True)
    assert ratio <= plan.ratio_achieved <= rec["ratio_reached"] + 1e-12
    for n in kept:  # what the analysis keeps whole, the plan leaves whole
        entry = plan.layers.get(str(n["layer"]), {})
        assert not entry.get("kv_groups" if n["kind"] == "attn" else "mlp_channels")
    assert plan.extra["kind_ratios"] == {"attn": rec["attn_ratios"], "mlp": rec["mlp_ratios"]}
    kd = plan.extra["knowledge_distribution"]  # what the run's report plots
    assert [kd[n["kind"]][n["layer"]] for n in nodes] == [n["relative_deviation"] for n in nodes]


def test_taylor_proxy_draws_calibration_apart_from_the_heldout(heldout, tiny_tokenizer):
    model = make_tiny("llama")
    snap = _snapshot(model)
    rec = analyze(model, tiny_tokenizer, 0.2, windows=2, seqlen=32, dataset=str(heldout), calib=str(heldout),
                  calib_samples=3, proxy="taylor", progress=False)
    _assert_bit_for_bit(model, snap)
    assert rec["calibration"]["windows"] == 3 and rec["calibration"]["disjoint_from_heldout"]
    with pytest.raises(ShearkitError, match="proxy"):
        analyze(model, tiny_tokenizer, 0.2, proxy="lora", dataset=str(heldout))


def test_per_kind_ratios_keep_one_structure_dense(tmp_path):
    model = make_tiny("llama")
    path = tmp_path / "alloc.json"
    path.write_text(json.dumps({"layer_ratios": [1, 1, 1], "attn_ratios": [0, 1, 1], "mlp_ratios": [1, 0, 1]}))
    plan = sk.prune(model, None, "structured-magnitude", 0.2, allocation=str(path), dry_run=True)
    assert plan.layers["0"]["mlp_channels"] and not plan.layers["0"]["kv_groups"]
    assert plan.layers["1"]["kv_groups"] and not plan.layers["1"]["mlp_channels"]
    path.write_text(json.dumps({"layer_ratios": [1, 1, 1], "attn_ratios": [0, 1, 1]}))
    with pytest.raises(ShearkitError, match="mlp_ratios"):
        sk.prune(model, None, "structured-magnitude", 0.2, allocation=str(path), dry_run=True)


def test_analyze_cli_end_to_end(tiny_model_dir, heldout, tmp_path):
    out, png = tmp_path / "sens.json", tmp_path / "sens.png"
    r = run_cli("analyze", str(tiny_model_dir), "--ratio", "0.25", "--data", str(heldout), "--tokens", "64",
                "--seqlen", "32", "--gamma", "0.2", "--out", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["heldout"]["windows"] == 2 and len(rec["unprunable"]) == 2 and len(rec["layer_ratios"]) == 3
    assert "kept whole" in r.stdout and "relative" in r.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    run = tmp_path / "run"
    r = run_cli("prune", str(tiny_model_dir), "--method", "structured-magnitude", "--ratio", "0.25", "--allocation",
                str(out), "--dry-run", "--json", "--out", str(run))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert 0.25 <= res["prune"]["ratio_achieved"] <= rec["ratio_reached"] + 1e-12
    r = run_cli("prune", str(tiny_model_dir), "--method", "wanda", "--ratio", "0.25", "--allocation", str(out))
    assert r.returncode == 2 and "only to structured methods" in r.stderr
    r = run_cli("analyze", str(tiny_model_dir), "--ratio", "0.25", "--data", str(heldout), "--out", str(tmp_path / "x.txt"))
    assert r.returncode == 2 and ".json" in r.stderr
