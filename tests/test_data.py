"""Named data sets, the local data directory, calibration sampling and their errors."""
import json

import pytest
import torch

from shearkit.data import calibration_windows, load_instructions, load_rows
from shearkit.errors import ShearkitError


def test_wikitext2_rows_follow_hf_layout(data_dir):
    rows = load_rows("wikitext2", data_dir=data_dir)
    assert len(rows.rows) == 4358  # one HF row per line
    assert rows.rows[0] == ""  # whitespace-only lines become ''
    assert rows.rows[1] == " = Robert Boulter = \n"  # others keep their newline
    assert rows.joiner == "\n\n" and rows.record["split"] == "test"


def test_ptb_joined_with_space(data_dir):
    rows = load_rows("ptb", data_dir=data_dir)
    assert rows.joiner == " " and len(rows.rows) == 3761


def _file_lines(path) -> list[str]:
    """The lines of a text file, without their line ends, read independently of the loader."""
    lines = path.read_bytes().decode("utf-8").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


@pytest.mark.parametrize("split", ["test", "validation"])
def test_ptb_text_is_the_stripped_standard_one(data_dir, split):
    """The `ptb_text_only` hub script yields each line stripped; the SparseGPT/Wanda/BESA protocol joins
    those with ' ', LoRAPrune's with '\\n\\n' (the joiner stays selectable)."""
    stripped = [line.strip() for line in _file_lines(data_dir / "ptb" / f"{split}.txt")]
    assert load_rows("ptb", split, data_dir=data_dir).text == " ".join(stripped)
    assert load_rows("ptb", split, data_dir=data_dir, joiner="\n\n").text == "\n\n".join(stripped)
    assert load_rows("ptb", split, data_dir=data_dir).record["rows"] == "stripped lines"


def test_wikitext2_text_keeps_raw_lines(data_dir):
    """WikiText-2 rows stay the HF `text` loader's: raw lines, whitespace-only ones emptied."""
    lines = _file_lines(data_dir / "wikitext-2-raw" / "test.txt")
    expected = "\n\n".join(line + "\n" if line.strip() else "" for line in lines)
    rows = load_rows("wikitext2", data_dir=data_dir)
    assert rows.text == expected and "rows" not in rows.record


def test_c4_concatenates_both_files(data_dir):
    rows = load_rows("c4", data_dir=data_dir)
    assert len(rows.record["source"]) == 2
    assert len(rows.rows) == 118 + 300


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SHEARKIT_DATA", str(data_dir))
    assert load_rows("ptb").record["source"][0].startswith(str(data_dir))


def test_missing_data_dir_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SHEARKIT_DATA", str(tmp_path / "nope"))
    with pytest.raises(ShearkitError, match="SHEARKIT_DATA"):
        load_rows("ptb")


def test_unknown_name_suggests(tmp_path):
    with pytest.raises(ShearkitError, match="Did you mean 'wikitext2'"):
        load_rows("wikitext", data_dir=tmp_path)


def test_file_missing_from_data_dir(tmp_path):
    with pytest.raises(ShearkitError, match="ptb/test.txt"):
        load_rows("ptb", data_dir=tmp_path)


def test_empty_file_is_refused(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n")
    with pytest.raises(ShearkitError, match="empty"):
        load_rows(str(f))


def test_jsonl_and_text_paths(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "c d"]))
    assert load_rows(str(j)).rows == ["a b", "c d"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}))
    with pytest.raises(ShearkitError, match="no 'text' field"):
        load_rows(str(bad))


def test_calibration_on_wikitext_test_is_refused(tiny_tokenizer, data_dir):
    with pytest.raises(ShearkitError, match="leak"):
        calibration_windows(tiny_tokenizer, "wikitext2", n=2, seqlen=16, data_dir=data_dir)


def test_calibration_windows_seeded_disjoint(tiny_tokenizer, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    a = calibration_windows(tiny_tokenizer, str(f), n=8, seqlen=16, seed=0)
    b = calibration_windows(tiny_tokenizer, str(f), n=8, seqlen=16, seed=0)
    c = calibration_windows(tiny_tokenizer, str(f), n=8, seqlen=16, seed=1)
    assert a.shape == (8, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_little_text(tiny_tokenizer, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n")
    with pytest.raises(ShearkitError, match="Too little text"):
        calibration_windows(tiny_tokenizer, str(f), n=4, seqlen=64)


def test_paper_default_calibration_exceeds_local_c4(data_dir):
    """128 x 2048 tokens is more than the local C4 holds: a clear error, not silent reuse."""
    from transformers import AutoTokenizer
    import shearkit.models.builtin as b

    path = b.cache_root() / "models" / "smollm2-135m"
    if not (path / "tokenizer.json").exists():
        pytest.skip("built-in model not cached yet")
    tok = AutoTokenizer.from_pretrained(path)
    with pytest.raises(ShearkitError, match="Too little text in 'c4'"):
        calibration_windows(tok, "c4", n=128, seqlen=2048, data_dir=data_dir)
    assert calibration_windows(tok, "c4", n=64, seqlen=512, data_dir=data_dir).shape == (64, 512)


def test_instructions(data_dir, tmp_path):
    recs = load_instructions("alpaca", data_dir=data_dir)
    assert len(recs) == 999 and {"instruction", "output"} <= set(recs[0])
    with pytest.raises(ShearkitError, match="not an instruction set"):
        load_instructions("ptb", data_dir=data_dir)
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(ShearkitError, match="'instruction' and 'output'"):
        load_instructions(str(bad))
