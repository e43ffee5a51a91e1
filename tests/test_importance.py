"""Importance: statistics from one calibration pass, scores checked against direct computation."""
import pytest
import torch

from shearkit.errors import ShearkitError
from shearkit.graph import kv_groups, mlp_channels
from shearkit.importance import aggregate, collect_stats, magnitude, taylor, wanda

from conftest import make_tiny

IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))


def test_aggregations():
    v = [torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])]
    assert aggregate(v, "sum").tolist() == [4.0, 6.0]
    assert aggregate(v, "mean").tolist() == [2.0, 3.0]
    assert aggregate(v, "max").tolist() == [3.0, 4.0]
    assert aggregate(v, "prod").tolist() == [3.0, 8.0]
    with pytest.raises(ShearkitError, match="aggregation"):
        aggregate(v, "median")


@pytest.mark.parametrize("p", [1, 2])
def test_magnitude_matches_direct_computation(p):
    model = make_tiny("opt")  # fc1 has a bias: it belongs to the channel
    gs = mlp_channels(model, 1)
    blk = model.model.decoder.layers[1]
    j = 7
    expect = (blk.fc1.weight[j].abs() ** p).sum() + blk.fc1.bias[j].abs() ** p + (blk.fc2.weight[:, j].abs() ** p).sum()
    got = magnitude(model, gs, p=p)
    torch.testing.assert_close(got[j], expect.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        blk.fc1.weight[3].zero_(); blk.fc1.bias[3] = 0; blk.fc2.weight[:, 3].zero_()
    assert int(magnitude(model, gs, p=p).argmin()) == 3


def test_magnitude_reads_conv1d_in_out_orientation():
    model = make_tiny("gpt2")
    gs = mlp_channels(model, 0)
    mlp = model.transformer.h[0].mlp
    expect = (mlp.c_fc.weight[:, 5] ** 2).sum() + mlp.c_fc.bias[5] ** 2 + (mlp.c_proj.weight[5] ** 2).sum()
    torch.testing.assert_close(magnitude(model, gs)[5], expect.detach(), rtol=1e-5, atol=1e-6)


def test_collect_stats_gradients_equal_a_direct_backward_and_restore_state():
    model = make_tiny("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    stats = collect_stats(model, IDS, grads=True, act_norms=True, batch_size=1)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    ref = make_tiny("llama")
    loss = sum(ref(input_ids=IDS[i:i + 1], labels=IDS[i:i + 1]).loss for i in range(2))
    loss.backward()
    g = ref.model.layers[1].mlp.up_proj.weight.grad
    torch.testing.assert_close(stats.grads["model.layers.1.mlp.up_proj"], g, rtol=1e-4, atol=1e-7)
    assert stats.n_tokens == IDS.numel()
    # act_sq: sum over tokens of x^2 for each input feature of down_proj
    seen = []
    h = ref.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        ref(IDS)
    h.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    torch.testing.assert_close(stats.act_sq["model.layers.0.mlp.down_proj"], (x ** 2).sum(0), rtol=1e-4, atol=1e-6)


def test_collect_stats_keeps_the_accumulated_gradient_without_a_copy():
    """The statistics hold the very tensor the backward passes accumulated into (one gradient-sized
    buffer per weight, not two), and the model's `.grad` is left as it was."""
    model = make_tiny("llama")
    w = model.model.layers[1].mlp.up_proj.weight
    ptrs = []
    h = w.register_post_accumulate_grad_hook(lambda p: ptrs.append(p.grad.data_ptr()))
    stats = collect_stats(model, IDS, grads=True, batch_size=1)
    h.remove()
    assert len(ptrs) == IDS.shape[0] and len(set(ptrs)) == 1  # accumulated in place over the batches
    assert stats.grads["model.layers.1.mlp.up_proj"].data_ptr() == ptrs[0]
    assert w.grad is None


def test_taylor_element_and_vector_match_direct_computation():
    model = make_tiny("qwen2")  # k/v/q biases are part of the KV group
    stats = collect_stats(model, IDS[:1])
    gs = kv_groups(model, 0)
    at = model.model.layers[0].self_attn
    hd, g = 16, 2
    q, k, v, o = (stats.grads[f"model.layers.0.self_attn.{n}_proj"] for n in "qkvo")
    qb, kb, vb = (stats.bias_grads[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv")
    rows_q, rows_kv = slice(g * hd, 2 * g * hd), slice(hd, 2 * hd)  # KV group 1
    terms = [at.q_proj.weight[rows_q] * q[rows_q], at.q_proj.bias[rows_q] * qb[rows_q],
             at.k_proj.weight[rows_kv] * k[rows_kv], at.k_proj.bias[rows_kv] * kb[rows_kv],
             at.v_proj.weight[rows_kv] * v[rows_kv], at.v_proj.bias[rows_kv] * vb[rows_kv],
             at.o_proj.weight[:, rows_q] * o[:, rows_q]]
    element = sum(t.detach().abs().sum() for t in terms)
    torch.testing.assert_close(taylor(model, gs, stats, variant="element")[1], element, rtol=1e-4, atol=1e-9)
    # vector-wise: |sum| per tensor slice (q with its bias, k with its bias, ...), then summed
    per_slice = [terms[0].sum() + terms[1].sum(), terms[2].sum() + terms[3].sum(), terms[4].sum() + terms[5].sum(),
                 terms[6].sum()]
    vector = sum(t.detach().abs() for t in per_slice)
    torch.testing.assert_close(taylor(model, gs, stats, variant="vector")[1], vector, rtol=1e-4, atol=1e-9)


def test_taylor_finds_a_channel_the_loss_ignores():
    """A channel whose down-projection column is zero changes nothing: its Taylor score is 0."""
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[:, 11].zero_()
    stats = collect_stats(model, IDS[:1])
    s = taylor(model, mlp_channels(model, 2), stats)
    assert s[11] == 0 and (s > 0).sum() == s.numel() - 1


def test_scores_need_their_statistics():
    model = make_tiny("llama")
    stats = collect_stats(model, IDS[:1], grads=False, act_norms=True)
    with pytest.raises(ShearkitError, match="gradients"):
        taylor(model, mlp_channels(model, 0), stats)
    assert wanda(model, mlp_channels(model, 0), stats).shape == (96,)
    with pytest.raises(ShearkitError, match="Calibration tokens"):
        collect_stats(model, torch.zeros(5, dtype=torch.long))
