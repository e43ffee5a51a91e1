"""Block surgery (surgery/blocks.py): removing decoder blocks keeps the model whole.

A model with blocks removed must compute what the original computes with those blocks skipped,
decode with its KV cache as it computes without it, keep its per-layer config lists in step
with its blocks (Qwen2's sliding-window layers), and save and reload to the same logits.
"""
from __future__ import annotations

import copy

import pytest
import torch

from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.surgery import rebuild_blocks, remove_blocks

from conftest import FAMILIES, VOCAB, make_tiny

PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model, ids=PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _skipped_logits(model, skip: set[int]) -> torch.Tensor:
    """The original model's logits with blocks `skip` passing their input through."""

    def passthrough(_mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return x if isinstance(out, torch.Tensor) else (x, *out[1:])

    handles = [get_adapter(model).layers[i].register_forward_hook(passthrough, with_kwargs=True) for i in skip]
    try:
        return _logits(model)
    finally:
        for h in handles:
            h.remove()


def _cached_equals_uncached(model) -> None:
    with torch.no_grad():
        out = model.generate(PROBE[:1], attention_mask=torch.ones_like(PROBE[:1]), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        full = model(input_ids=out, use_cache=False).logits[0, PROBE.shape[1] - 1:-1].argmax(-1)
    assert out[0, PROBE.shape[1]:].tolist() == full.tolist()


def _sliding_qwen2():
    """A tiny Qwen2 whose blocks 1 and 2 use a 4-token sliding window (block 0 full attention)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                   tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_blocks_compute_as_skipped_and_reload(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny(family)
    n = get_adapter(model).num_layers
    gone = {0} if n == 2 else {0, 2}
    want = _skipped_logits(model, gone)
    kept_modules = [b for i, b in enumerate(get_adapter(model).layers) if i not in gone]
    remove_blocks(model, sorted(gone))
    ad = get_adapter(model)
    assert list(ad.layers) == kept_modules and model.config.num_hidden_layers == n - len(gone)
    for j, blk in enumerate(ad.layers):  # KV-cache slots renumbered 0..n'-1
        assert {m.layer_idx for m in blk.modules() if isinstance(getattr(m, "layer_idx", None), int)} == {j}
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=0)
    _cached_equals_uncached(model)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(again), want, atol=1e-5, rtol=0)


def test_sliding_window_layer_types_follow_their_blocks(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _sliding_qwen2()
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    want = _skipped_logits(model, {0})
    assert not torch.allclose(want, _skipped_logits(_strip_window(copy.deepcopy(model)), {0}))  # the window matters
    remove_blocks(model, [0])
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 0  # every kept block is past the full-attention ones
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=0)
    _cached_equals_uncached(model)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert again.config.layer_types == ["sliding_attention", "sliding_attention"]
    torch.testing.assert_close(_logits(again), want, atol=1e-5, rtol=0)


def _strip_window(model):
    model.config.layer_types = ["full_attention"] * 3
    for blk in get_adapter(model).layers:
        blk.self_attn.sliding_window = None
        blk.attention_type = "full_attention"
    return model


def test_per_layer_widths_follow_their_blocks():
    from shearkit.io.modeling import LAYER_SHAPES_KEY
    from shearkit.surgery.sync import layer_shapes

    model = make_tiny("llama")
    shapes = layer_shapes(model)
    setattr(model.config, LAYER_SHAPES_KEY, shapes)
    remove_blocks(model, [1])
    assert getattr(model.config, LAYER_SHAPES_KEY)["layers"] == [shapes["layers"][0], shapes["layers"][2]]


def test_bad_removals_are_refused_and_change_nothing():
    model = make_tiny("opt")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ShearkitError, match=r"blocks \[3\].*0\.\.2"):
        remove_blocks(model, [3])
    with pytest.raises(ShearkitError, match="leave none"):
        remove_blocks(model, [0, 1, 2])
    blk = get_adapter(model).layers[0]
    with pytest.raises(ShearkitError, match="two positions"):
        rebuild_blocks(model, [0, 0], [blk, blk])
    assert get_adapter(model).num_layers == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_scaled_by_layer_index_is_refused():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64,
                                  scale_attn_by_inverse_layer_idx=True)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ShearkitError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(model, [0])
    remove_blocks(model, [2])  # the survivors keep their positions: allowed
    assert model.config.num_hidden_layers == 2
