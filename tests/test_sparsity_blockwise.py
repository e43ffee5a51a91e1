"""The blockwise calibration runner: captured inputs replay to the same outputs as a full forward."""
from __future__ import annotations

import pytest
import torch

from shearkit.arch import get_adapter
from shearkit.calibration import capture_inputs, final_hidden, walk_blocks
from shearkit.calibration.stats import collect_input_stats
from shearkit.errors import ShearkitError

from conftest import make_tiny


def _tokens(n=4, seqlen=12, seed=0):
    return torch.randint(0, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_blockwise_dense_pass_equals_full_forward(tiny_model, batch_size):
    toks = _tokens()
    hidden = torch.cat(final_hidden(tiny_model, toks, batch_size=batch_size))
    with torch.no_grad():
        ref = tiny_model(input_ids=toks, output_hidden_states=True).hidden_states[-1]
    norm = get_adapter(tiny_model).final_norm
    got = norm(hidden) if norm is not None else hidden
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_capture_records_every_kwarg_including_rope():
    model = make_tiny("llama")
    inputs = capture_inputs(model, _tokens(2), batch_size=1)
    kw = inputs.kwargs[0]
    assert "position_embeddings" in kw  # RoPE cos/sin: newer transformers layers need it
    cos, sin = kw["position_embeddings"]
    assert cos.shape[-2:] == (12, 16) and sin.shape == cos.shape
    assert "position_ids" in kw and "attention_mask" in kw
    assert inputs.hidden[0].shape == (1, 12, 64)
    assert inputs.kwargs[1] is kw  # identical per-batch arguments are stored once


def test_capture_leaves_model_untouched_and_stem_home():
    model = make_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture_inputs(model, _tokens(2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_walk_sees_pruned_predecessor_output():
    """A change made by the callback to block i must reach block i+1's inputs."""
    model = make_tiny("llama")
    toks = _tokens(2)
    seen = {}

    def zero_block0(view, inputs):
        seen[view.index] = inputs.hidden[0].clone()
        if view.index == 0:
            for p in view.projections():
                p.module.weight.data.zero_()  # block 0 becomes the identity (residual only)

    inputs = capture_inputs(model, toks)
    first_in = inputs.hidden[0].clone()
    walk_blocks(model, inputs, zero_block0)
    torch.testing.assert_close(seen[1], first_in)


def test_walk_moves_each_block_to_compute_device_and_back():
    model = make_tiny("llama")
    inputs = capture_inputs(model, _tokens(1))
    devices = []
    walk_blocks(model, inputs, lambda v, x: devices.append(next(v.module.parameters()).device == x.device))
    assert devices == [True] * 3
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_input_stats_match_direct_computation():
    model = make_tiny("llama")
    inputs = capture_inputs(model, _tokens(3))
    view = get_adapter(model).block_view(0)
    q = view.attn.q
    captured = []
    h = q.module.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    stats = collect_input_stats(view.module, {q.name: q.module}, inputs, hessian=True)
    h.remove()
    x = torch.cat(captured)
    st = stats[q.name]
    assert st.tokens == 36
    torch.testing.assert_close(st.col_norm, x.norm(dim=0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st.hessian, 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-5)


def test_capture_rejects_bad_tokens():
    with pytest.raises(ShearkitError, match="samples, seqlen"):
        capture_inputs(make_tiny("llama"), torch.zeros(5, dtype=torch.long))


def test_layers_reading_the_same_input_share_statistics():
    model = make_tiny("llama")
    inputs = capture_inputs(model, _tokens(3))
    view = get_adapter(model).block_view(0)
    mods = {p.name: p.module for p in view.projections()}
    stats = collect_input_stats(view.module, mods, inputs, hessian=True)
    a, m = view.attn, view.mlp
    assert stats[a.q.name] is stats[a.k.name] is stats[a.v.name]
    assert stats[m.inputs[0].name] is stats[m.inputs[1].name]
    distinct = {id(s) for s in stats.values()}
    assert len(distinct) == 4  # attention input, o input, mlp input, down input
    assert all(s.tokens == 36 for s in stats.values())
    # o_proj's input differs from q's (different statistics)
    assert not torch.allclose(stats[a.o.name].sq_norm, stats[a.q.name].sq_norm)
