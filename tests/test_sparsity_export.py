"""Sparse export: dense safetensors with zeros and the compressed-tensors sparse layouts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shearkit
from shearkit.errors import ShearkitError
from shearkit.io.sparse_export import (compress_weight, decompress_weight, is_24, load_compressed, save_compressed,
                                       save_dense, sparse_targets, to_semi_structured)

from conftest import make_tiny


def _size(d):
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_compressed_round_trip_all_families(tiny_model, tmp_path, nm):
    shearkit.prune(tiny_model, None, "magnitude", 0.5, nm=nm)
    save_compressed(tiny_model, None, tmp_path / "ct")
    back, _ = load_compressed(tmp_path / "ct")
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 320, (1, 10))
    torch.testing.assert_close(_logits(back, ids), _logits(tiny_model, ids))
    q = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert sc["global_sparsity"] == pytest.approx(0.5)
    assert set(sc["targets"]) == set(sparse_targets(tiny_model))
    if nm and tiny_model.config.model_type != "gpt2":
        assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    else:  # GPT-2's Conv1D stores (in, out): its 2:4 groups do not run along the stored rows
        assert sc["format"] == "sparse-bitmask"


def test_compressed_file_is_smaller_than_dense_at_half_sparsity(tmp_path):
    m = make_tiny("llama")
    plan = shearkit.prune(m, None, "magnitude", 0.5)
    save_dense(m, None, tmp_path / "dense")
    save_compressed(m, None, tmp_path / "ct", plan=plan)
    assert json.loads((tmp_path / "ct" / "plan.json").read_text())["method"] == "magnitude"
    targets = sum(m.get_submodule(t).weight.numel() * 4 for t in sparse_targets(m))
    saved = _size(tmp_path / "dense") - _size(tmp_path / "ct")
    # values halve; the bitmask (1 bit per weight) and row offsets cost back a little
    assert 0.4 * targets < saved < 0.5 * targets
    reloaded = type(m).from_pretrained(tmp_path / "dense")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), reloaded.state_dict().values()))


def test_bitmask_layout_matches_compressed_tensors_helpers():
    from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks

    w = torch.randn(5, 16)
    w[w.abs() < 0.7] = 0
    parts = compress_weight(w, "sparse-bitmask")
    assert torch.equal(parts["bitmask"], pack_bitmasks(w != 0))
    assert torch.equal(unpack_bitmasks(parts["bitmask"], [5, 16]), w != 0)
    assert torch.equal(parts["compressed"], w[w != 0])
    counts = (w != 0).sum(1)
    assert torch.equal(parts["row_offsets"], torch.cumsum(counts, 0) - counts)
    assert torch.equal(decompress_weight(parts), w)


def test_24_layout_holds_two_values_per_group_even_with_extra_zeros():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])  # second group has one non-zero
    parts = compress_weight(w, "sparse-24-bitmask")
    assert parts["compressed"].shape == (1, 4)
    assert torch.equal(decompress_weight(parts), w)
    assert is_24(w) and not is_24(torch.ones(2, 8))
    with pytest.raises(ShearkitError, match="2:4"):
        compress_weight(torch.ones(2, 8), "sparse-24-bitmask")


def test_save_refuses_existing_dir_and_bad_format(tmp_path):
    m = make_tiny("llama")
    (tmp_path / "x").mkdir()
    with pytest.raises(ShearkitError, match="already exists"):
        save_compressed(m, None, tmp_path / "x")
    with pytest.raises(ShearkitError, match="sparse-bitmask"):
        save_compressed(m, None, tmp_path / "y", fmt="zip")


def test_load_compressed_refuses_plain_folder(tmp_path):
    save_dense(make_tiny("llama"), None, tmp_path / "d")
    with pytest.raises(ShearkitError, match="sparsity_config"):
        load_compressed(tmp_path / "d")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_matches_dense_on_cuda():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    shearkit.prune(m, None, "magnitude", nm="2:4")
    ids = torch.randint(0, 320, (1, 64), device="cuda")
    ref = _logits(m, ids)
    assert to_semi_structured(m) == 14
    torch.testing.assert_close(_logits(m, ids), ref, rtol=2e-2, atol=2e-2)


def test_semi_structured_refuses_cpu_weights():
    m = make_tiny("llama")
    shearkit.prune(m, None, "magnitude", nm="2:4")
    with pytest.raises(ShearkitError, match="CUDA"):
        to_semi_structured(m)


def _legacy_ct() -> str:
    """Folder holding compressed-tensors 0.13 (the last release with the sparse compressors)."""
    path = os.environ.get("SHEARKIT_CT_LEGACY", "")
    if not path or not (Path(path) / "compressed_tensors" / "compressors" / "sparse_compressors").is_dir():
        pytest.skip("needs compressed-tensors 0.13 in a side folder: `pip install --no-deps --target DIR "
                    "compressed-tensors==0.13.0` and SHEARKIT_CT_LEGACY=DIR (.ci/run does this)")
    return path


def _worker(legacy: str, *args) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([legacy, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ct_legacy_worker.py")), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("family,nm", [("llama", None), ("llama", "2:4"), ("qwen2", "2:4"), ("opt", None)])
def test_compressed_tensors_own_decompressor_reads_our_files(tmp_path, family, nm):
    from safetensors import safe_open

    legacy = _legacy_ct()
    m = make_tiny(family)
    shearkit.prune(m, None, "magnitude", 0.5, nm=nm)
    save_compressed(m, None, tmp_path / "ct")
    _worker(legacy, "decompress", tmp_path / "ct", tmp_path / "dense.safetensors")
    with safe_open(str(tmp_path / "dense.safetensors"), "pt") as f:
        assert f.metadata()["ct_version"] == "0.13.0"
        assert f.metadata()["format"] == ("sparse-24-bitmask" if nm else "sparse-bitmask")
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    ours = m.state_dict()
    assert {f"{t}.weight" for t in sparse_targets(m)} <= theirs.keys()  # every pruned weight came back
    for k, v in theirs.items():  # and equals ours bit for bit, zeros included
        assert torch.equal(v, ours[k]), k


def test_our_loader_reads_compressed_tensors_own_output(tmp_path):
    legacy = _legacy_ct()
    m = make_tiny("llama")
    shearkit.prune(m, None, "wanda", 0.5, calib=torch.randint(0, 320, (2, 16)))
    save_dense(m, None, tmp_path / "dense")
    targets = sparse_targets(m)
    _worker(legacy, "compress", tmp_path / "dense", tmp_path / "ct", "sparse-bitmask", json.dumps(targets))
    back, _ = load_compressed(tmp_path / "ct")
    for (k, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 320, (1, 10))
    torch.testing.assert_close(_logits(back, ids), _logits(m, ids))
