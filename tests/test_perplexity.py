"""Perplexity follows the concatenated, non-overlapping-window protocol; checked against an
independent computation through transformers' own loss."""
import math

import pytest
import torch

from shearkit.errors import ShearkitError
from shearkit.eval.perplexity import perplexity

from conftest import make_tiny


def _reference_ppl(model, tokenizer, text, seqlen, limit=None):
    """Independent: HF's built-in causal-LM loss (mean over L-1 shifted tokens) per window."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    if limit:
        n = min(n, limit)
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor([ids[i * seqlen:(i + 1) * seqlen]])
            losses.append(model(input_ids=w, labels=w).loss.item())
    return math.exp(sum(losses) / len(losses)), n


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_matches_reference(family, tiny_tokenizer, tmp_path):
    model = make_tiny(family)
    lines = ["the quick brown fox jumps over the lazy dog", "", "pruning makes language models smaller"] * 30
    f = tmp_path / "t.txt"
    f.write_text("\n".join(lines) + "\n")
    rows = [l + "\n" if l.strip() else "" for l in lines]
    ref, n = _reference_ppl(model, tiny_tokenizer, "\n\n".join(rows), 32)
    got = perplexity(model, tiny_tokenizer, str(f), seqlen=32, batch_size=3)
    assert got["windows"] == n and got["tokens_scored"] == n * 31
    assert got["ppl"] == pytest.approx(ref, rel=1e-4)
    lim = perplexity(model, tiny_tokenizer, str(f), seqlen=32, limit=2)
    assert lim["windows"] == 2 and lim["limit"] == 2
    assert lim["ppl"] == pytest.approx(_reference_ppl(model, tiny_tokenizer, "\n\n".join(rows), 32, 2)[0], rel=1e-4)


def test_seqlen_capped_at_model_max(tiny_tokenizer, tmp_path):
    model = make_tiny("gpt2")  # n_positions = 256
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    r = perplexity(model, tiny_tokenizer, str(f), seqlen=4096, limit=1)
    assert r["seqlen"] == 256 and r["seqlen_requested"] == 4096


def test_bad_arguments(tiny_tokenizer, tmp_path):
    model = make_tiny("llama")
    f = tmp_path / "t.txt"
    f.write_text("a b c\n")
    with pytest.raises(ShearkitError, match="--limit"):
        perplexity(model, tiny_tokenizer, str(f), seqlen=8, limit=0)
    with pytest.raises(ShearkitError, match="fewer than one window"):
        perplexity(model, tiny_tokenizer, str(f), seqlen=200)


@pytest.mark.slow
def test_real_model_wikitext2_quick(smollm, data_dir):
    """The README's quick check: SmolLM2-135M, WikiText-2, seqlen 512, 8 windows."""
    model, tok = smollm
    rows = [l if l.strip() else "" for l in open(data_dir / "wikitext-2-raw/test.txt", encoding="utf-8").readlines()]
    ref, _ = _reference_ppl(model, tok, "\n\n".join(rows), 512, limit=2)
    got = perplexity(model, tok, "wikitext2", seqlen=512, limit=2, data_dir=data_dir)
    assert got["ppl"] == pytest.approx(ref, rel=1e-4)
    assert 10 < got["ppl"] < 60  # a 135M instruct model on WikiText-2


@pytest.mark.slow
def test_real_model_ptb_standard_protocol(smollm, data_dir):
    """Dense SmolLM2-135M on the standard PTB test text (stripped lines joined with ' '), seqlen 512, first
    40 windows: within 1% of the 63.34 that issue 10's independent computation of that protocol gives."""
    model, tok = smollm
    got = perplexity(model, tok, "ptb", seqlen=512, limit=40, data_dir=data_dir)
    assert got["windows"] == 40 and got["rows"] == "stripped lines"
    assert got["ppl"] == pytest.approx(63.34, rel=0.01)
