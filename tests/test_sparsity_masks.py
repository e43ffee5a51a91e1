"""Pure sparsity functions checked against their published definitions on small matrices."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shearkit.errors import ShearkitError
from shearkit.sparsity.apply import PackedMasks, pack_masks, unpack_masks
from shearkit.sparsity.besa import LayerAllocation, candidate_rates, repair_counts
from shearkit.sparsity.magnitude import magnitude_mask
from shearkit.sparsity.masks import layer_mask, nm_mask, parse_nm, rank_in_row, row_mask
from shearkit.sparsity.sparsegpt import sparsegpt_prune
from shearkit.sparsity.wanda import wanda_mask, wanda_scores


def _layer_data(out=32, inp=128, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(inp, generator=g) * 3 + 0.1  # uneven input channels, as in LLMs
    x = torch.randn(n, inp, generator=g) * scale + 0.3 * torch.randn(n, 1, generator=g)
    w = torch.randn(out, inp, generator=g)
    return w, x


def _rel_err(w, w_hat, x):
    return ((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm()).item()


def test_wanda_mask_equals_bruteforce_definition():
    w, x = _layer_data(out=6, inp=8)
    norm = x.norm(dim=0)
    keep = wanda_mask(w, norm, 0.5)
    for r in range(w.shape[0]):
        scores = [abs(w[r, j].item()) * norm[j].item() for j in range(w.shape[1])]
        pruned = sorted(range(w.shape[1]), key=lambda j: scores[j])[:4]
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(pruned)


def test_wanda_scores_are_weight_times_column_norm():
    w, x = _layer_data(out=3, inp=5)
    s = wanda_scores(w, x.norm(dim=0))
    assert torch.allclose(s[1, 2], w[1, 2].abs() * torch.sqrt((x[:, 2] ** 2).sum()))


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_mask_bruteforce_and_exact_pattern(nm):
    n, m = nm
    w, _ = _layer_data(out=5, inp=16)
    keep = nm_mask(w.abs(), n, m)
    groups = keep.reshape(5, -1, m)
    assert bool((groups.sum(-1) == m - n).all())  # exactly n zeros in every group of m
    for r, gi in itertools.product(range(5), range(16 // m)):
        vals = w[r, gi * m:(gi + 1) * m].abs()
        expect = set(vals.argsort()[:n].tolist())
        assert set(torch.nonzero(~groups[r, gi]).flatten().tolist()) == expect


def test_nm_mask_refuses_ragged_rows():
    with pytest.raises(ShearkitError, match="multiple of M"):
        nm_mask(torch.rand(3, 10), 2, 4)


@pytest.mark.parametrize("text,expect", [("2:4", (2, 4)), ("4:8", (4, 8)), (None, None)])
def test_parse_nm(text, expect):
    assert parse_nm(text) == expect


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b"])
def test_parse_nm_rejects(bad):
    with pytest.raises(ShearkitError, match="--nm"):
        parse_nm(bad)


@given(rows=st.integers(1, 9), cols=st.integers(1, 17), s=st.floats(0.0, 0.95), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_row_and_layer_masks_hit_exact_count(rows, cols, s, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    k = round(s * rows * cols)
    assert int((~row_mask(scores, s)).sum()) == k
    assert int((~layer_mask(scores, s)).sum()) == k
    # row mask: within a row, every pruned entry scores <= every kept one (per-row comparison)
    keep = row_mask(scores, s)
    for r in range(rows):
        if (~keep[r]).any() and keep[r].any():
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


def test_magnitude_is_a_layer_threshold():
    w, _ = _layer_data(out=8, inp=16)
    keep = magnitude_mask(w, 0.5)
    assert w[~keep].abs().max() <= w[keep].abs().min()
    assert int((~keep).sum()) == 64


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    w, x = _layer_data()
    h = 2 / x.shape[0] * x.T @ x
    w_s, keep = sparsegpt_prune(w, h, 0.5, nm=nm, blocksize=32)
    err_sgpt = _rel_err(w, w_s, x)
    err_mag = _rel_err(w, w * magnitude_mask(w, 0.5, nm), x)
    err_wanda = _rel_err(w, w * wanda_mask(w, x.norm(dim=0), 0.5, nm), x)
    assert err_sgpt < err_wanda < err_mag
    assert bool((w_s[~keep] == 0).all())
    assert int((~keep).sum()) == w.numel() // 2
    if nm:
        assert bool(((~keep).reshape(w.shape[0], -1, nm[1]).sum(-1) == nm[0]).all())


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_sparsegpt_exact_sparsity_with_uneven_blocks(s):
    w, x = _layer_data(out=7, inp=100)
    h = 2 / x.shape[0] * x.T @ x
    w_s, keep = sparsegpt_prune(w, h, s, blocksize=32)  # blocks of 32, 32, 32, 4
    assert int((w_s == 0).sum()) == round(s * w.numel()) == int((~keep).sum())


def test_sparsegpt_without_pruning_keeps_weights():
    w, x = _layer_data(out=4, inp=16)
    w_s, keep = sparsegpt_prune(w, 2 / 512 * x.T @ x, 0.0)
    assert bool(keep.all()) and torch.allclose(w_s, w, atol=1e-5)


def test_sparsegpt_dead_inputs_are_pruned_first():
    w, x = _layer_data(out=4, inp=16)
    x[:, 3] = 0  # an input that never fires: its weights do not matter
    w_s, keep = sparsegpt_prune(w, 2 / 512 * x.T @ x, 0.25)
    assert not keep[:, 3].any()


def test_rank_in_row_is_position_in_sorted_order():
    s = torch.tensor([[0.3, 0.1, 0.2], [5.0, 7.0, 6.0]])
    assert rank_in_row(s).tolist() == [[2, 0, 1], [0, 2, 1]]


def test_pack_unpack_masks_round_trip():
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(5, 13, generator=g) > 0.5, "b": torch.rand(3, 8, generator=g) > 0.3}
    packed, meta = pack_masks(masks)
    assert packed["a"].shape == (5, 2) and packed["a"].dtype == torch.uint8
    back = unpack_masks(packed, meta)
    assert all(torch.equal(back[k], masks[k]) for k in masks)
    held = PackedMasks()
    for k, v in masks.items():
        held.add(k, v)
    assert list(held) == ["a", "b"] and all(torch.equal(held[k], masks[k]) for k in masks)
    assert torch.equal(pack_masks(held)[0]["a"], packed["a"])


# -- BESA allocation ----------------------------------------------------------------------------

def test_candidate_rates():
    r = candidate_rates(0.01)
    assert r.numel() == 101 and r[0] == 1.0 and r[-1] == 0.0 and bool((r[:-1] > r[1:]).all())


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_allocation_starts_at_target_and_mask_is_straight_through(target):
    scores = torch.rand(6, 40, generator=torch.Generator().manual_seed(1))
    alloc = LayerAllocation(scores, target, per_row=True)
    assert abs(alloc.sparsity().item() - target) < 0.01
    m = alloc.mask()
    hard = (alloc.rank >= torch.floor(alloc.row_rates().detach() * 40 + 1e-6).view(-1, 1)).float()
    assert torch.equal(m.detach(), hard)  # forward value is the hard mask
    (m * torch.arange(40.0)).sum().backward()  # the soft path carries gradient to the logits
    assert alloc.theta.grad is not None and alloc.theta.grad.abs().sum() > 0


def test_sigmoid_smoothing_bounds_rates_but_plain_softmax_does_not():
    scores = torch.rand(1, 50)
    for smooth, reachable in ((True, False), (False, True)):
        alloc = LayerAllocation(scores, 0.5, per_row=False, init_width=None, sigmoid_smooth=smooth)
        with torch.no_grad():
            alloc.theta.copy_(torch.where(alloc.rates >= 0.7, 20.0, -20.0).view(1, -1))
        assert (alloc.sparsity().item() >= 0.7) == reachable
        if smooth:
            assert 0.37 < alloc.sparsity().item() < 0.63


@given(rates=st.lists(st.floats(0, 1), min_size=1, max_size=12), cols=st.integers(1, 20),
       frac=st.floats(0, 1))
@settings(max_examples=80, deadline=None)
def test_repair_counts_hit_total_exactly(rates, cols, frac):
    half = len(rates) // 2
    parts = [torch.tensor(rates[:half] or [0.5]), torch.tensor(rates[half:] or [0.5])]
    widths = [cols, cols + 3]
    n = sum(p.numel() * w for p, w in zip(parts, widths))
    total = round(frac * n)
    counts = repair_counts(parts, widths, total)
    assert sum(int(c.sum()) for c in counts) == total
    for c, w in zip(counts, widths):
        assert bool((c >= 0).all()) and bool((c <= w).all())


def test_repair_counts_keep_the_learned_shape():
    rates = [torch.tensor([0.2, 0.8]), torch.tensor([0.5])]
    counts = repair_counts(rates, [100, 100], 150)
    c = torch.cat(counts).tolist()
    assert c[0] < c[2] < c[1] and sum(c) == 150
