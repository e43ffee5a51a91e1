"""Self-speculative decoding (speculative.py): the output equals plain greedy `generate` token for
token, whatever the draft does (rejections, full acceptance, end-of-sequence inside a draft);
the draft is a view of the same model (nothing copied) and leaves it exactly as it was."""
from __future__ import annotations

import copy

import pytest
import torch

import shearkit
from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.speculative import shared_copy_blocks, skipping_blocks, speculative_generate
from shearkit.surgery.extend import extend_blocks
from shearkit.surgery.shared_block import share_block, shared_parameters

from conftest import VOCAB, make_tiny


def _prompt(seed: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, new: int) -> torch.Tensor:
    """Plain greedy `generate`, stopping at the model's generation config's end-of-sequence token."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)


def _no_eos(model):
    model.generation_config.eos_token_id = None  # run to the length limit (both decoders read this)
    return model


def _flexigpt(family: str):
    model = make_tiny(family)
    share_block(model, 1, 0, 4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters and norms as after training: the replaced block matters
        for p in shared_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_output_equals_greedy_generate_with_rejections(family):
    model = _no_eos(_flexigpt(family))
    assert shared_copy_blocks(model) == [1]
    rejected = accepted = 0
    for seed, length in [(0, 4), (1, 9), (2, 17)]:
        ids = _prompt(seed, length)
        for new in (1, 2, 7, 24):
            for lookahead in (1, 3, 5):
                out = speculative_generate(model, ids, new, lookahead=lookahead)
                assert torch.equal(out.sequences, _greedy(model, ids, new)), (seed, new, lookahead)
                assert out.sequences.shape[1] == length + new
                rejected += out.drafted - out.accepted
                accepted += out.accepted
    assert rejected > 0 and accepted > 0  # both paths of the cache bookkeeping ran


def test_a_draft_equal_to_the_model_is_always_accepted():
    """Copies added with output-norm scale 0 change nothing, so the draft (the original model) agrees
    with the extended one on every token: every round accepts all its proposals plus one."""
    model = _no_eos(make_tiny("llama"))
    extend_blocks(model, 3, "block", rank=4, norm_init=0.0)
    ids = _prompt(5, 6)
    out = speculative_generate(model, ids, 21, lookahead=4)
    assert torch.equal(out.sequences, _greedy(model, ids, 21))
    assert out.accepted == out.drafted and out.acceptance == 1.0
    assert out.rounds == 4  # 1 token from the prompt's forward, then 4 rounds of 4 proposals + 1


def test_stops_at_the_end_of_sequence_token_like_generate():
    model = _no_eos(_flexigpt("llama"))
    ids = _prompt(1, 9)
    plain = _greedy(model, ids, 24)[0, ids.shape[1]:].tolist()
    for at in (0, 5, 11):  # the first token, inside a draft, later
        eos = plain[at]
        model.generation_config.eos_token_id = eos
        out = speculative_generate(model, ids, 24, lookahead=3)
        want = _greedy(model, ids, 24)
        assert torch.equal(out.sequences, want) and out.sequences[0, -1].item() == eos
        assert out.sequences.shape[1] == ids.shape[1] + plain.index(eos) + 1


def test_the_draft_is_a_view_and_the_model_is_restored():
    model = _flexigpt("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    before = copy.deepcopy(model.config.to_dict())
    layers = get_adapter(model).layers
    idx = [b.self_attn.layer_idx for b in layers]
    ptrs = {p.data_ptr() for p in model.parameters()}
    with skipping_blocks(model, [1]) as draft:
        assert draft is model and get_adapter(model).num_layers == 2 and model.config.num_hidden_layers == 2
        assert get_adapter(model).layers[1] is layers[2] and layers[2].self_attn.layer_idx == 1
        assert model.config.layer_types == ["full_attention", "full_attention"]
        assert {p.data_ptr() for p in model.parameters()} < ptrs  # the same tensors, fewer of them: no copy
    assert get_adapter(model).layers is layers and [b.self_attn.layer_idx for b in layers] == idx
    assert model.config.to_dict() == before


def test_bad_input_is_refused():
    model = _flexigpt("llama")
    with pytest.raises(ShearkitError, match="one sequence"):
        speculative_generate(model, _prompt(0, 4).repeat(2, 1), 4)
    with pytest.raises(ShearkitError, match="no shared blocks"):
        speculative_generate(make_tiny("llama"), _prompt(0, 4), 4)
    with pytest.raises(ShearkitError, match="one block must stay"):
        speculative_generate(model, _prompt(0, 4), 4, skip=[0, 1, 2])
    with pytest.raises(ShearkitError, match=r"must be in 0\.\.2"):
        speculative_generate(model, _prompt(0, 4), 4, skip=[3])
    with pytest.raises(ShearkitError, match="lookahead"):
        speculative_generate(model, _prompt(0, 4), 4, lookahead=0)


def test_a_dense_model_can_draft_with_named_blocks_skipped():
    model = _no_eos(make_tiny("mistral"))
    ids = _prompt(4, 7)
    out = speculative_generate(model, ids, 15, skip=[2], lookahead=2)
    assert torch.equal(out.sequences, _greedy(model, ids, 15))
    assert shearkit.get_adapter(model).num_layers == 3
