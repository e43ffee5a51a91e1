"""Block importance (importance/blocks.py): Block Influence and the perplexity drop.

BI is checked against its definition computed by hand from the whole model's hidden states;
the perplexity drop against the perplexity of a model with the block really removed, and the
model it scored must come back unchanged.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from shearkit.arch import get_adapter
from shearkit.errors import ShearkitError
from shearkit.importance.blocks import block_influence, block_scores, perplexity_drop
from shearkit.surgery import remove_blocks

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))


def _bi_by_hand(model, tokens) -> list[float]:
    """1 - mean over tokens of cos(h_i, h_i+1), from output_hidden_states (the last entry is
    after the final norm, so the last block's output is taken by a hook)."""
    ad = get_adapter(model)
    last = []
    h = ad.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            hs = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        h.remove()
    states = [*hs[:-1], last[0]]
    out = []
    for i in range(ad.num_layers):
        x, y = states[i].reshape(-1, states[i].shape[-1]), states[i + 1].reshape(-1, states[i].shape[-1])
        cos = [torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(x, y)]
        out.append(1 - float(sum(cos)) / len(cos))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_block_influence_is_its_definition(family, batch_size):
    model = make_tiny(family)
    got = block_influence(model, CALIB, batch_size=batch_size)
    want = _bi_by_hand(model, CALIB)
    assert len(got) == get_adapter(model).num_layers
    assert got == pytest.approx(want, abs=1e-5)
    assert len({round(v, 4) for v in got}) == len(got)  # the blocks are told apart


def test_block_influence_with_offloaded_activations():
    model = make_tiny("llama")
    assert block_influence(model, CALIB, offload_activations=True) == pytest.approx(_bi_by_hand(model, CALIB),
                                                                                   abs=1e-5)


def _ppl(model, tokens) -> float:
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_perplexity_drop_is_removal_and_leaves_the_model_as_it_was(family):
    model = make_tiny(family)
    before = copy.deepcopy(model.state_dict())
    modules = list(model.modules())
    got = perplexity_drop(model, CALIB)
    base = _ppl(model, CALIB)
    want = []
    for i in range(get_adapter(model).num_layers):
        cut = copy.deepcopy(model)
        remove_blocks(cut, [i])
        want.append(_ppl(cut, CALIB) - base)
    assert got == pytest.approx(want, rel=0, abs=1e-6 * base)  # float32 noise on perplexities of ~base
    # bit for bit the same model: same modules, same tensors, no hook left behind
    assert list(model.modules()) == modules
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(before[k], state[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())


def test_unknown_importance_is_refused():
    with pytest.raises(ShearkitError, match="bi, ppl"):
        block_scores(make_tiny("llama"), CALIB, "cosine")


@pytest.mark.parametrize("importance", ["bi", "ppl"])
def test_scoring_resumed_from_a_checkpoint_gives_the_same_scores(importance, tmp_path):
    """A pass stopped after one block (its snapshot kept) and resumed ends with the uninterrupted
    pass's scores exactly; a checkpoint of other settings is refused, naming them."""
    from shearkit.importance.blocks import ScoreCheckpoint

    model = make_tiny("llama")
    whole = block_scores(model, CALIB, importance, batch_size=2)

    def ckpt(resume, batch_size=2):
        return ScoreCheckpoint(tmp_path, model, CALIB, importance=importance, batch_size=batch_size, resume=resume)

    first = ckpt(False)
    real = first.maybe_save

    def stop_after_one(done, total, state, tensors=None):
        real(done, total, state, tensors)
        raise KeyboardInterrupt  # as a kill after the first snapshot

    first.maybe_save = stop_after_one
    with pytest.raises(KeyboardInterrupt):
        block_scores(model, CALIB, importance, batch_size=2, checkpoint=first)
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot-00000001"]
    assert block_scores(model, CALIB, importance, batch_size=2, checkpoint=ckpt(True)) == whole
    assert [p.name for p in tmp_path.iterdir()] == [f"snapshot-{get_adapter(model).num_layers:08d}"]
    with pytest.raises(ShearkitError, match="already holds the checkpoint"):
        block_scores(model, CALIB, importance, batch_size=2, checkpoint=ckpt(False))
    with pytest.raises(ShearkitError, match="other batch_size"):
        block_scores(model, CALIB, importance, batch_size=1, checkpoint=ckpt(True, batch_size=1))
