"""FLOPs per token follow the stated formula."""
from shearkit.eval.flops import forward_flops_per_token

from conftest import make_tiny


def test_llama_flops_formula():
    m = make_tiny("llama")  # hidden 64, 4 heads (16 dims), 2 KV heads, MLP 96, 3 layers, vocab 320
    f = forward_flops_per_token(m, seqlen=9)
    per_layer = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64)
    assert f["projections"] == 3 * per_layer
    assert f["attention"] == 3 * 4 * 4 * 16 * 5
    assert f["lm_head"] == 2 * 64 * 320
    assert f["total"] == f["projections"] + f["attention"] + f["lm_head"]


def test_gpt2_fused_qkv_counted_once_per_slice():
    m = make_tiny("gpt2")
    f = forward_flops_per_token(m, seqlen=1)
    per_layer = 2 * (3 * 64 * 64 + 64 * 64 + 2 * 96 * 64)
    assert f["projections"] == 3 * per_layer
