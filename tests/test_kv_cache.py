"""shearkit.kv_cache: the cache the speed benchmark and speculative decoding hand to a model's forward is
really used (under whichever keyword this transformers version takes), so one-token decode steps give
the logits of a forward over the whole sequence."""
import pytest
import torch

from conftest import make_tiny
from shearkit.kv_cache import cache_kwarg, new_cache


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_decoding_with_the_cache_gives_the_full_forward(family):
    model = make_tiny(family).eval()
    seq = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(0))
    kw = {cache_kwarg(model): new_cache(model)}
    with torch.no_grad():
        nxt = model(input_ids=seq, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        for _ in range(5):
            seq = torch.cat([seq, nxt], 1)
            step = model(input_ids=nxt, use_cache=True, **kw).logits[:, -1]
            torch.testing.assert_close(step, model(input_ids=seq, use_cache=False).logits[:, -1], atol=1e-5, rtol=0)
            nxt = step.argmax(-1, keepdim=True)
    assert kw[cache_kwarg(model)].get_seq_length() == seq.shape[1]  # every token of seq went through the cache
