"""Architecture adapters give the same uniform view for every family."""
import pytest
import torch

from shearkit.arch import get_adapter, supported_model_types
from shearkit.errors import ShearkitError

from conftest import FAMILIES, make_tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_view_matches_module_shapes(family):
    model = make_tiny(family)
    ad = get_adapter(model)
    assert ad.num_layers == model.config.num_hidden_layers
    for b in ad.blocks():
        a = b.attn
        hidden = ad.hidden_size
        assert a.q.weight.shape == (a.num_heads * a.head_dim, hidden)
        assert a.k.weight.shape == (a.num_kv_heads * a.head_dim, hidden)
        assert a.v.weight.shape == (a.num_kv_heads * a.head_dim, hidden)
        assert a.o.weight.shape == (hidden, a.num_heads * a.head_dim)
        assert a.num_heads % a.num_kv_heads == 0
        for p in b.mlp.inputs:
            assert p.weight.shape == (b.mlp.width, hidden)
        assert b.mlp.output.weight.shape == (hidden, b.mlp.width)
        for n, m in b.linear_modules().items():
            assert model.get_submodule(n) is m


@pytest.mark.parametrize("family", FAMILIES)
def test_proj_view_computes_the_layer(family):
    """Each Proj's (out, in) weight and bias reproduce what the module computes (Conv1D transposed,
    fused q/k/v sliced)."""
    model = make_tiny(family)
    b = get_adapter(model).block_view(0)
    x = torch.randn(3, get_adapter(model).hidden_size)
    for p in [b.attn.q, b.attn.k, b.attn.v, *b.mlp.inputs]:
        full = p.module(x)
        part = full[:, p.out_offset : p.out_offset + p.out_features] if p.fused else full
        ref = x @ p.weight.T + (p.bias if p.bias is not None else 0)
        torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-5)


def test_gqa_geometry():
    ad = get_adapter(make_tiny("llama"))
    a = ad.block_view(0).attn
    assert (a.num_heads, a.num_kv_heads, a.group_size) == (4, 2, 2)


def test_param_counts_tied_and_untied():
    tied = get_adapter(make_tiny("llama_tied")).param_counts()
    assert tied["total"] > tied["unique"]  # lm_head shares the embedding
    untied = get_adapter(make_tiny("llama")).param_counts()
    assert untied["total"] == untied["unique"]
    for c in (tied, untied):
        assert c["non_embedding"] == c["unique"] - c["embedding"]
        assert c["blocks"] <= c["non_embedding"]


def test_unknown_architecture_names_supported():
    import transformers

    cfg = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    model = transformers.BertForMaskedLM(cfg)
    with pytest.raises(ShearkitError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "bert" in msg and "not supported" in msg
    for mt in ("llama", "mistral", "qwen2", "opt", "gpt2"):
        assert mt in msg
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "opt", "gpt2"}
