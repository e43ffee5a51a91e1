"""The chunked output head (`arch.lm_head`): the same loss and gradients as full-vocabulary logits,
in the importance passes and in the Trainer, and a fall-back where logits are not head(hidden)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, make_tiny
from shearkit.arch.lm_head import causal_lm_loss, split_head
from shearkit.errors import ShearkitError
from shearkit.recovery.config import RecoverConfig


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(family):
    model = make_tiny(family)
    ids = torch.randint(0, 320, (2, 23))
    out = {}
    for chunk in (0, 7):  # 7 does not divide 2 x 22 label tokens: a short last chunk
        model.zero_grad()
        loss = causal_lm_loss(model, ids, chunk)
        loss.backward()
        out[chunk] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = out[0], out[7]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    torch.testing.assert_close(l0, model(input_ids=ids, labels=ids).loss.detach(), rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7)


def test_models_whose_logits_are_transformed_fall_back_to_full_logits():
    model = make_tiny("llama")
    assert split_head(model) is not None
    model.config.final_logit_softcapping = 30.0
    assert split_head(model) is None
    ids = torch.randint(0, 320, (1, 9))
    torch.testing.assert_close(causal_lm_loss(model, ids, 4), model(input_ids=ids, labels=ids).loss)


def test_importance_passes_score_the_same_with_the_chunked_head():
    from shearkit.importance.passes import lora_pass, taylor_pass

    tokens = torch.randint(0, 320, (4, 17))
    for work in (taylor_pass, lora_pass):
        full = work(make_tiny("llama"), tokens, batch_size=2)
        chunked = work(make_tiny("llama"), tokens, batch_size=2, loss_chunk=5)
        assert full.keys() == chunked.keys()
        for k in full:
            torch.testing.assert_close(chunked[k], full[k], rtol=1e-4, atol=1e-9)


def test_trainer_with_a_chunked_head_follows_the_same_loss_curve(tiny_tokenizer, tmp_path, chat_tok):
    from test_trainer import adapters, make_trainer

    recs = [{"instruction": f"say {w} " * (i + 1), "output": f"the {w} fox jumps"} for i, w in
            enumerate(["quick", "lazy", "brown", "red"])]
    (tmp_path / "i.json").write_text(json.dumps(recs))
    runs = {}
    for chunk in (0, 3):
        t = make_trainer(chat_tok, tmp_path / "i.json", loss_chunk=chunk, steps=3)
        assert t._chunk == chunk  # one process: the chunked head is in use
        h = t.fit()
        runs[chunk] = (h["losses"], adapters(t))
    (l0, a0), (l1, a1) = runs[0], runs[3]
    assert len(l0) == 3
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=0)
    for k in a0:
        torch.testing.assert_close(a1[k], a0[k], rtol=1e-4, atol=1e-6)


def test_a_negative_chunk_is_refused():
    with pytest.raises(ShearkitError, match="loss_chunk"):
        RecoverConfig(loss_chunk=-1)
