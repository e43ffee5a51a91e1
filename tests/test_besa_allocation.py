"""BESA's learned allocation beats uniform Wanda on block reconstruction error at the same
sparsity: the reason BESA exists. Both rank the weights of every row by the same Wanda metric,
so the only difference is how many each layer (or row) gives up."""
from __future__ import annotations

import copy

import pytest
import torch

import shearkit
from shearkit.arch import get_adapter
from shearkit.calibration import capture_inputs
from shearkit.sparsity.layers import block_linears

from conftest import VOCAB, make_tiny

RATIO = 0.5
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _block0_error(dense, pruned, tokens) -> float:
    """Relative squared error of the first block's output against the dense block's, on the
    same (dense) inputs: ||Y_dense - Y_pruned||^2 / ||Y_dense||^2 over all tokens."""
    inputs = capture_inputs(dense, tokens)
    bd, bp = get_adapter(dense).block_view(0).module, get_adapter(pruned).block_view(0).module
    num = den = 0.0
    for b in range(len(inputs)):
        yd, yp = inputs.call(bd, b), inputs.call(bp, b)
        num += float((yd - yp).pow(2).sum())
        den += float(yd.pow(2).sum())
    return num / den


@torch.no_grad()
def _final_error(dense, pruned, tokens) -> float:
    """The same error on the last hidden states of the whole model (errors compound)."""
    hd = dense(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
    hp = pruned(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
    return float((hd - hp).pow(2).sum() / hd.pow(2).sum())


def _block_zeros(model) -> list[int]:
    return [sum(int((r.weight == 0).sum()) for r in block_linears(v).values()) for v in get_adapter(model).blocks()]


@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_besa_allocation_beats_uniform_wanda(granularity):
    dense = make_tiny("llama")
    wanda, besa = copy.deepcopy(dense), copy.deepcopy(dense)
    shearkit.prune(wanda, None, "wanda", RATIO, calib=CALIB)
    plan = shearkit.prune(besa, None, "besa", RATIO, calib=CALIB, granularity=granularity, epochs=3)
    assert plan.extra["optimizer"] == "prodigy"
    assert _block_zeros(besa) == _block_zeros(wanda)  # the same sparsity in every block
    rates = [r for block in plan.layers.values() for r in block["sparsity"].values()]
    assert max(rates) - min(rates) > 0.05  # BESA did move sparsity between layers
    for tokens in (CALIB, HELD_OUT):
        e_wanda, e_besa = _block0_error(dense, wanda, tokens), _block0_error(dense, besa, tokens)
        assert e_besa < 0.9 * e_wanda, (granularity, e_besa, e_wanda)
    assert _final_error(dense, besa, CALIB) < _final_error(dense, wanda, CALIB)
