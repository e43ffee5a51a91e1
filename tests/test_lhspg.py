"""LHSPG (LoRAShear Alg. 4): the projection zeroes exactly the groups it selects, leaves the others on
the plain AdamW path, reaches every set's quota, and the zeroed groups come out physically."""
import copy

import pytest
import torch

from shearkit.arch.modules import unwrap
from shearkit.graph.groups import layer_groups
from shearkit.graph.planner import finish_plan
from shearkit.importance.lora_saliency import lora_saliency, proxies
from shearkit.plan import Plan
from shearkit.recovery.lhspg import LHSPG, period_quotas
from shearkit.surgery import apply_structured

from conftest import FAMILIES, make_tiny
from test_graph import _lora


def _ids(seed=0, n=2, t=10):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def _sets(model):
    from shearkit.arch import get_adapter

    m = unwrap(model)

    n = get_adapter(m).num_layers
    return {(kind, i): gs for i in range(n) for kind, gs in layer_groups(m, i, "kv_group").items()}


def _quotas(sets):
    q = {}
    for (kind, i), gs in sets.items():
        if i == 0:
            continue  # layer 0 stays whole: its LoRA keeps training like any AdamW parameter
        q[(kind, i)] = 1 if kind == "kv_group" else gs.size // 3
    return q


def _opt(model, variant, quotas, warmup=2, periods=2, period_steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    return LHSPG(params, model, _sets(model), quotas, lr=lr, warmup=warmup, periods=periods,
                 period_steps=period_steps, variant=variant)


def _train(model, opt, steps, seed=0):
    for s in range(steps):
        ids = _ids(seed + s)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _plan(model, opt):
    layers = {}
    for (kind, i), pruned in opt.pruned.items():
        if pruned:
            layers.setdefault(str(i), {})["kv_groups" if kind == "kv_group" else "mlp_channels"] = pruned
    plan = Plan("lorashear", "structured", 0.0, layers=layers)
    return finish_plan(unwrap(model), plan)


def test_period_quotas_sum_to_the_total():
    assert period_quotas(10, 3) == [3, 4, 3]
    assert sum(period_quotas(7, 4)) == 7
    assert period_quotas(0, 2) == [0, 0]


@pytest.mark.parametrize("variant", ["paper", "decay"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_set_loses_its_quota_and_removal_gives_the_same_logits(family, variant):
    torch.manual_seed(0)
    model = _lora(make_tiny(family))
    model.train()
    sets = _sets(model)
    quotas = _quotas(sets)
    opt = _opt(model, variant, quotas)
    _train(model, opt, opt.total_steps)
    for key, q in quotas.items():
        assert len(opt.pruned[key]) == q, key
    assert set(opt.pruned) == set(quotas)  # sets without a quota are never touched
    model.eval()
    ids = _ids(99)
    with torch.no_grad():
        before = model(ids).logits
        if variant == "paper":  # the pruned groups are exactly zero in the base and in the factors
            from shearkit.recovery.lhspg import _gather, build_sets

            for key, s in build_sets(model, {k: sets[k] for k in quotas}).items():
                j = torch.tensor(opt.pruned[key])
                for sl in s.slices:
                    assert _gather(sl, j).abs().max() == 0
                keep = torch.tensor([g for g in range(sets[key].size) if g not in opt.pruned[key]])
                assert all(_gather(sl, keep).abs().amax(1).gt(0).all() for sl in s.slices)
        opt.remove_scales()
        merged = copy.deepcopy(model)
        if variant == "decay":  # the forward scales end at exactly 0: zeroing the rows is the same model
            opt.scales = None
        merged = merged.merge_and_unload()
        plan = _plan(merged, opt)
        apply_structured(merged, plan)
        after = merged(ids).logits
    assert plan.ratio_achieved > 0
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_no_quota_is_plain_adamw():
    torch.manual_seed(0)
    a = _lora(make_tiny("llama"))
    b = copy.deepcopy(a)
    a.train(), b.train()
    opt_a = _opt(a, "paper", {})
    opt_b = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    _train(a, opt_a, 6)
    _train(b, opt_b, 6)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_projection_touches_only_the_selected_groups():
    """One step inside a period with the same gradients: every LoRA entry and base weight outside the
    selected groups moves exactly as under AdamW; the selected groups are folded and shrunk."""
    torch.manual_seed(0)
    model = _lora(make_tiny("llama"))
    sets = _sets(model)
    quotas = {("mlp_channel", 1): 12, ("kv_group", 2): 1}
    opt = _opt(model, "paper", quotas, warmup=0, periods=1, period_steps=4)
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for m in (model, ref):
        gg = torch.Generator().manual_seed(1)
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=gg) * 1e-2
    opt.step()
    opt_ref.step()
    selected = {k: v for k, v in opt.active.items() if v}
    assert {k: len(v) for k, v in selected.items()} == quotas
    touched = {}  # param name -> bool mask of entries the projection may change
    m, r = unwrap(model), unwrap(ref)
    for key, groups in selected.items():
        for part in sets[key].parts:
            t = m.get_submodule(part.module).weight
            mask = touched.setdefault(part.module + ".weight", torch.zeros_like(t, dtype=torch.bool))
            idx = part.index[torch.tensor(groups)].reshape(-1)
            if part.dim == 0:
                mask[idx] = True
            else:
                mask[:, idx] = True
    changed = 0
    for (n, p) in m.named_parameters():
        q = r.get_parameter(n)
        mask = touched.get(n)
        if mask is None:
            assert torch.equal(p, q), n
        else:
            assert torch.equal(p[~mask], q[~mask]), n
            changed += int((p[mask] != q[mask]).sum())
    assert changed > 0


def test_saliency_proxies_follow_their_definitions():
    w2, inner, ba2, n = torch.tensor([4.0, 9.0]), torch.tensor([2.0, -3.0]), torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0])
    p = proxies(torch.stack([w2, inner, ba2, n], 1).double())
    torch.testing.assert_close(p["magnitude"], torch.tensor([2.0, 3.0]).double())
    torch.testing.assert_close(p["cosine"], torch.tensor([2 / 2 + 1, -3 / 6 + 1]).double())
    torch.testing.assert_close(p["taylor_second"], torch.tensor([2.0, 4.5]).double())
    model = _lora(make_tiny("llama"))
    s = lora_saliency(model, _sets(model))
    assert all(v.shape == (gs.size,) and torch.isfinite(v).all() for v, gs in zip(s.values(), _sets(model).values()))
