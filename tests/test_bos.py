"""No BOS token per window: with a tokenizer that adds one to every text it encodes (as Llama's
does), the perplexity and calibration windows are cut from the text tokenised once, without
special tokens, so they hold no BOS and exactly the tokens of that single encoding."""
from __future__ import annotations

import pytest
import torch

from shearkit.data import calibration_windows, load_rows
from shearkit.eval.perplexity import perplexity

from conftest import make_tiny

SEQLEN = 16
LINES = ["the quick brown fox jumps over the lazy dog", "pruning makes language models smaller",
         "hello world, this is a test of shearkit"] * 12


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("\n".join(LINES) + "\n")
    return f


def _once(tokenizer, path) -> list[int]:
    """The whole text as shearkit joins it, tokenised once without special tokens."""
    return tokenizer(load_rows(str(path)).text, add_special_tokens=False)["input_ids"]


def test_the_tokenizer_really_adds_a_bos(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert bos_tokenizer("the fox")["input_ids"][0] == bos
    assert bos not in bos_tokenizer("the fox", add_special_tokens=False)["input_ids"]


def test_perplexity_windows_hold_no_bos(bos_tokenizer, text_file):
    model = make_tiny("llama")
    seen: list[torch.Tensor] = []

    def record(_module, _args, kwargs):
        seen.append(kwargs["input_ids"].detach().clone())

    model.register_forward_pre_hook(record, with_kwargs=True)
    got = perplexity(model, bos_tokenizer, str(text_file), seqlen=SEQLEN, batch_size=2)
    windows = torch.cat(seen)
    ids = _once(bos_tokenizer, text_file)
    n = len(ids) // SEQLEN
    assert n >= 4 and got["windows"] == windows.shape[0] == n
    assert not (windows == bos_tokenizer.bos_token_id).any()
    assert windows.flatten().tolist() == ids[: n * SEQLEN]  # one encoding, cut in order
    assert got["tokens_scored"] == n * (SEQLEN - 1)


def test_calibration_windows_hold_no_bos(bos_tokenizer, text_file):
    ids = _once(bos_tokenizer, text_file)
    slots = len(ids) // SEQLEN
    windows = calibration_windows(bos_tokenizer, str(text_file), n=slots, seqlen=SEQLEN, seed=0)
    assert not (windows == bos_tokenizer.bos_token_id).any()
    # every slot drawn once, so the windows are exactly the single encoding's slots
    assert sorted(map(tuple, windows.tolist())) == sorted(
        tuple(ids[i * SEQLEN:(i + 1) * SEQLEN]) for i in range(slots))
