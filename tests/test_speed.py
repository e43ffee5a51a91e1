"""Speed and size measurement: each model in its own child process (its own peak memory), repeats
taken in turn, ratios read as the first model over the baseline, and the CLI's table and words."""
import re

import pytest
import torch
from typer.testing import CliRunner

import shearkit
from shearkit.cli import app
from shearkit.errors import ShearkitError
from shearkit.io.save import save
from shearkit.eval.speed import dir_size, ratio_lines

from conftest import VOCAB, make_tiny

SETTING = dict(batch=2, length=64, decode_tokens=4, repeats=3, warmup=1)


def make_big():
    """A tiny-vocabulary llama with far wider layers than `make_tiny`'s: slower, and tens of MiB of weights."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def small_vs_big():
    small, big = make_tiny("llama"), make_big()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the autouse fixture does for function-scoped tests; the children follow it
    try:
        return shearkit.bench(small, big, labels=["small", "big"], **SETTING), small, big
    finally:
        torch.set_num_threads(before)


def test_bench_pair_reports_each_model(small_vs_big):
    res, small, big = small_vs_big
    for k, model in (("small", small), ("big", big)):
        r = res[k]
        assert r["prefill_tokens_per_s"]["n"] == SETTING["repeats"] and r["prefill_tokens_per_s"]["median"] > 0
        assert r["decode_tokens_per_s"]["median"] > 0
        assert r["peak_memory_bytes"] > 0
        assert r["weight_bytes"] >= sum(p.numel() * 4 for p in model.parameters())
        assert r["params"]["unique"] == sum(p.numel() for p in model.parameters())
        assert r["setting"]["threads"] == 1


def test_ratios_read_first_model_over_baseline(small_vs_big):
    """The small model is much faster: its ratios against the big baseline are above 1 and say so."""
    res, *_ = small_vs_big
    q = res["ratios"]
    assert (q["model"], q["baseline"], q["label"]) == ("small", "big", "small / big")
    tps = {k: res[k]["prefill_tokens_per_s"]["median"] for k in ("small", "big")}
    assert q["prefill_speedup"] == tps["small"] / tps["big"]
    assert q["prefill_speedup"] > 1.5 and q["decode_speedup"] > 1
    assert q["params_ratio"] == res["small"]["params"]["unique"] / res["big"]["params"]["unique"] < 1
    assert q["memory_ratio"] == res["small"]["peak_memory_bytes"] / res["big"]["peak_memory_bytes"] < 1
    words = "\n".join(ratio_lines(q))
    assert f"prefill: {q['prefill_speedup']:.2f}× faster than big (model / baseline tokens/s)" in words
    assert f"uses {q['memory_ratio']:.2f}× the memory of big" in words


def test_ratio_words_for_a_slower_model():
    q = {"model": "a", "baseline": "b", "prefill_speedup": 0.5, "decode_speedup": 2.0, "params_ratio": 1.0,
         "memory_ratio": 1.5}
    words = "\n".join(ratio_lines(q))
    assert "prefill: 0.50× the speed of b, 2.00× slower (model / baseline tokens/s)" in words
    assert "decode: 2.00× faster than b" in words and "uses 1.50× the memory of b" in words


def test_peak_memory_is_per_model(small_vs_big):
    """Each model's peak is its own: the big model's exceeds the small one's by most of its extra weights
    (measured together in one process, the two peaks were the same process RSS)."""
    res, *_ = small_vs_big
    extra = res["big"]["weight_bytes"] - res["small"]["weight_bytes"]
    assert extra > 50 * 2**20
    gap = res["big"]["peak_memory_bytes"] - res["small"]["peak_memory_bytes"]
    assert 0.8 * extra < gap < 3 * extra
    assert res["small"]["peak_memory_bytes"] < 0.5 * res["big"]["peak_memory_bytes"]


def test_cli_bench_vs_words_and_full_table_when_piped(tmp_path, tiny_tokenizer):
    """`bench A --vs B` through the CLI (output not a terminal): the full table, however wide, and the ratio
    of A over the baseline B in words."""
    root = tmp_path / ("a-long-directory-name-so-that-the-table-is-wider-than-eighty-columns" * 2)
    small_dir, big_dir = root / "small", root / "big"
    for d, m in ((small_dir, make_tiny("llama")), (big_dir, make_big())):
        m.save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
    r = CliRunner().invoke(app, ["bench", str(small_dir), "--vs", str(big_dir), "--length", "64", "--batch", "2",
                                 "--decode-tokens", "4", "--repeats", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    header = next(line for line in lines if "model" in line and "params" in line)
    for col in ("non-emb params", "disk MiB", "prefill tok/s", "decode tok/s", "peak MiB"):
        assert col in header
    assert any(str(small_dir) in line for line in lines) and any(str(big_dir) in line for line in lines)
    assert "…" not in r.stdout
    m = re.search(r"prefill: ([0-9.]+)× faster than " + re.escape(str(big_dir)) + r" \(model / baseline tokens/s\)",
                  r.stdout)
    assert m and float(m.group(1)) > 1, r.stdout
    assert re.search(r"peak memory: uses 0\.[0-9]+× the memory of " + re.escape(str(big_dir)), r.stdout)


def test_bench_a_per_layer_width_model_object(tmp_path, tiny_tokenizer):
    """A pruned model loaded back (its class is built at run time) travels to its child by value."""
    model = make_tiny("llama")
    plan = shearkit.prune(model, None, "structured-magnitude", 0.3, allocation="global")
    loaded, _ = shearkit.load(save(model, tiny_tokenizer, tmp_path / "m", plan=plan), device="cpu")
    assert "<locals>" in type(loaded).__qualname__
    res = shearkit.bench(loaded, labels=["pruned"], batch=1, length=16, decode_tokens=2, repeats=1, warmup=0)
    assert res["pruned"]["params"]["unique"] == sum(p.numel() for p in loaded.parameters())
    assert "ratios" not in res


def test_a_model_that_fails_to_load_in_its_child_is_a_clear_error(tmp_path):
    with pytest.raises(ShearkitError, match="holds no config.json"):
        shearkit.bench(str(tmp_path), repeats=1, warmup=0, length=8, decode_tokens=1)


def test_dir_size(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_text("{}")
    assert dir_size(tmp_path) == 100 and dir_size(None) is None
