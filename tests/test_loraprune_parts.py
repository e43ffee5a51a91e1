"""The parts LoRAPrune is built from: masks in the forward pass, LoRA-guided importance, the schedule."""
import copy

import pytest
import torch

from shearkit.arch.modules import unwrap
from shearkit.graph.groups import kv_groups, layer_groups, mlp_channels
from shearkit.importance.lora_grad import g_hat, importance_map, lora_group_scores
from shearkit.importance.schedule import cubic_ratio
from shearkit.plan import Plan
from shearkit.surgery import apply_structured
from shearkit.surgery.output_masks import StructuredMasks

from conftest import FAMILIES, make_tiny
from test_graph import _lora

TOL = dict(rtol=1e-4, atol=1e-5)


def _ids(n=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 320, (n, t), generator=g)


def _plan(model) -> Plan:
    """KV groups, lone query heads (one per KV head, under GQA) and MLP channels, in two layers."""
    from shearkit.graph import layer_geometry

    geo = layer_geometry(unwrap(model))
    first, last = geo[0], geo[-1]
    g = last["heads"] // last["kv_heads"]
    heads = list(range(0, last["heads"], g)) if g > 1 else [1]
    layers = {"0": {"kv_groups": [1], "mlp_channels": list(range(0, first["mlp"], 3))},
              str(len(geo) - 1): {"heads": heads, "mlp_channels": [5, 7, last["mlp"] - 2]}}
    return Plan("t", "structured", 0.1, layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_forward_equals_the_sliced_model(family):
    """Masks in the forward pass give the pruned model's outputs, LoRA updates included."""
    model = _lora(make_tiny(family))
    plan = _plan(model)
    ids = _ids()
    sliced = apply_structured(copy.deepcopy(model), plan)
    with StructuredMasks(model, plan):
        masked = model(ids).logits
    torch.testing.assert_close(masked, sliced(ids).logits, **TOL)


def test_masks_update_and_removal_restore_the_model_exactly():
    model = _lora(make_tiny("llama"))
    ids = _ids()
    dense = model(ids).logits
    one = Plan("t", "structured", 0.1, layers={"1": {"mlp_channels": [3]}})
    only = apply_structured(copy.deepcopy(model), one)
    masks = StructuredMasks(model, _plan(model))
    first = model(ids).logits
    masks.update(one)
    torch.testing.assert_close(model(ids).logits, only(ids).logits, **TOL)
    assert not torch.allclose(first, model(ids).logits)
    masks.remove()
    torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=0)


def _lora_loss(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_g_hat_is_minus_the_change_of_BA_after_one_sgd_step(family):
    """G_hat = gB A + B gA - gB gA equals -Δ(BA) after one plain SGD step of learning rate 1."""
    torch.manual_seed(0)
    model = _lora(make_tiny(family))
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            for d in m.lora_dropout.values():
                d.p = 0.0
    _lora_loss(model, _ids())
    layers = {n: m for n, m in unwrap(model).named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert layers
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        before = (b @ a).detach().clone()
        gh = g_hat(layer)
        with torch.no_grad():
            a2, b2 = a - a.grad, b - b.grad  # one SGD step, lr 1
        torch.testing.assert_close(gh, -(b2 @ a2 - before), rtol=1e-5, atol=1e-6, msg=name)


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_lora_ranking_follows_the_true_gradient_taylor_ranking():
    """Group scores from the LoRA gradients rank MLP channels like the true weight-gradient Taylor scores."""
    from peft import LoraConfig, get_peft_model

    from shearkit.importance import collect_stats, taylor

    torch.manual_seed(0)
    base = make_tiny("llama")
    ids = _ids(4, 32, seed=1)
    stats = collect_stats(copy.deepcopy(base), ids, grads=True, batch_size=4)
    truth = {i: taylor(base, mlp_channels(base, i), stats) for i in range(3)}
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.eval()
    model(input_ids=ids, labels=ids).loss.backward()
    sets = {("mlp_channel", i): mlp_channels(model, i) for i in range(3)}
    ours = lora_group_scores(model, sets)
    rho = [_spearman(ours[("mlp_channel", i)], truth[i]) for i in range(3)]
    assert min(rho) > 0.5, rho


def test_scoring_holds_one_module_at_a_time():
    """Peak extra allocation while scoring stays below a few weight-sized tensors of the largest module,
    far below a gradient for every weight (which llm-pruner's statistics hold)."""
    from torch.profiler import ProfilerActivity, profile

    model = _lora(make_tiny("llama"))
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    sets = {}
    for i in range(3):
        sets.update({(k, i): gs for k, gs in layer_groups(model, i).items()})
    largest = max(m.base_layer.weight.numel() for m in unwrap(model).modules() if hasattr(m, "base_layer")) * 4
    all_weights = sum(m.base_layer.weight.numel() for m in unwrap(model).modules() if hasattr(m, "base_layer")) * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lora_group_scores(model, sets)
    peak = _peak_allocated(prof)
    assert 0 < peak <= 4 * largest < all_weights, (peak, largest, all_weights)


def _peak_allocated(prof) -> int:
    """Peak of the bytes allocated and not yet freed while profiling: allocations counted at the op
    that made them (its own, not its children's), frees at their `[memory]` event."""
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_importance_map_uses_the_effective_weight():
    model = _lora(make_tiny("llama"))
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    layer = unwrap(model).model.layers[0].mlp.up_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    expect = (g_hat(layer) * (layer.base_layer.weight + s * b @ a)).abs()
    torch.testing.assert_close(importance_map(layer), expect.detach())


def test_cubic_schedule():
    total, rf = 100, 0.5
    rs = [cubic_ratio(t, total, rf) for t in range(total + 1)]
    assert rs[0] == rs[10] == 0.0 and rs[91] == rs[100] == rf
    assert all(b >= a for a, b in zip(rs, rs[1:]))
    assert rs[50] > rf / 2  # cubic: most of the pruning early
    assert cubic_ratio(1, 1, 0.3) == 0.3 and cubic_ratio(0, 2, 0.3, warmup=0.0) == 0.0


def test_kv_group_scores_cover_every_kv_group():
    model = _lora(make_tiny("llama"))
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    s = lora_group_scores(model, {("kv_group", 1): kv_groups(model, 1)})[("kv_group", 1)]
    assert s.shape == (2,) and torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("which", ["taylor", "lora"])
def test_importance_passes_score_the_same_with_recomputed_activations(which):
    """Activation checkpointing changes memory, not scores (dropout is off while it recomputes)."""
    from shearkit.importance.passes import lora_pass, taylor_pass

    fn = taylor_pass if which == "taylor" else lora_pass
    ids = _ids(4, 16, seed=3)
    base = make_tiny("llama")
    torch.manual_seed(0)
    plain = fn(copy.deepcopy(base), ids, 2)
    torch.manual_seed(0)
    model = copy.deepcopy(base).train()
    ckpt = fn(model, ids, 2, checkpointing=True)
    assert model.training and not model.is_gradient_checkpointing  # restored as it was
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k], rtol=1e-4, atol=1e-7, msg=str(k))


def test_plain_scores_are_the_group_sums_of_the_importance_maps():
    """Without normalisation a channel's score is the sum of |G_hat * W_eff| over its rows of gate and
    up and its column of down: a first-order loss change, comparable across group kinds."""
    model = _lora(make_tiny("llama"))
    model(input_ids=_ids(), labels=_ids()).loss.backward()
    mlp = unwrap(model).model.layers[1].mlp
    got = lora_group_scores(model, {("mlp_channel", 1): mlp_channels(model, 1)}, normalize=False)
    want = importance_map(mlp.gate_proj).sum(1) + importance_map(mlp.up_proj).sum(1) + importance_map(mlp.down_proj).sum(0)
    torch.testing.assert_close(got[("mlp_channel", 1)], want, rtol=1e-5, atol=1e-9)
