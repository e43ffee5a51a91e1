"""Speed and size measurement: structure of the record, interleaved pair with ratios."""
import shearkit
from shearkit.eval.speed import dir_size

from conftest import make_tiny


def test_bench_pair_reports_ratios(tmp_path):
    a, b = make_tiny("llama"), make_tiny("gpt2")
    res = shearkit.bench(a, b, labels=["a", "b"], batch=2, length=16, decode_tokens=4, repeats=2, warmup=1)
    for k in ("a", "b"):
        r = res[k]
        assert r["prefill_tokens_per_s"]["n"] == 2 and r["prefill_tokens_per_s"]["median"] > 0
        assert r["decode_tokens_per_s"]["median"] > 0
        assert r["peak_memory_bytes"] > 0
        model = a if k == "a" else b
        assert r["weight_bytes"] >= sum(p.numel() * 4 for p in model.parameters())
        assert r["params"]["unique"] == sum(p.numel() for p in (a if k == "a" else b).parameters())
    q = res["ratios"]
    assert q["params_ratio"] == res["b"]["params"]["unique"] / res["a"]["params"]["unique"]


def test_dir_size(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "config.json").write_text("{}")
    assert dir_size(tmp_path) == 100 and dir_size(None) is None
