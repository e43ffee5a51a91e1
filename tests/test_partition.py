"""Disjoint data partitions: parts by rows (text) or records (instructions) never share one, cover the
set, hold what they asked for, are fixed by the seed; too small a set is a clear error."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from shearkit.data import load_instructions, load_rows, tokenize_stream
from shearkit.data.partition import partition_records, partition_rows, windows
from shearkit.errors import ShearkitError

WORDS = ["quick", "brown", "lazy", "small", "hello", "world", "test", "fox", "dog", "over"]


@pytest.fixture
def rows_file(tmp_path):
    """Distinct rows of different lengths, with blank lines between some (blank rows carry no text)."""
    lines = []
    for i in range(60):
        lines.append(f"row {i} " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7)))
        if i % 5 == 0:
            lines.append("")
    p = tmp_path / "rows.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def _tokens(tok, rows) -> int:
    return sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in rows)


def test_text_parts_are_disjoint_cover_the_set_and_hold_their_tokens(tiny_tokenizer, rows_file):
    parts = {"analysis": 120, "heldout": 60}
    got = partition_rows(tiny_tokenizer, str(rows_file), parts, seed=3)
    assert list(got) == ["analysis", "heldout", "rest"]
    original = [r for r in load_rows(str(rows_file)).rows if r.strip()]
    # every row in exactly one part: the parts' rows together are the set's rows, each once
    assert Counter(r for p in got.values() for r in p.rows) == Counter(original)
    assert len(set(original)) == len(original)  # rows are distinct, so this is disjointness too
    for name, need in parts.items():
        assert got[name].record["tokens"] == _tokens(tiny_tokenizer, got[name].rows) >= need
        assert got[name].record["part"] == name and got[name].record["seed"] == 3
        # the part took no row more than it needed: without its last row it would fall short
        assert got[name].record["tokens"] - max(_tokens(tiny_tokenizer, [r]) for r in got[name].rows) < need
    assert got["rest"].record["rows"] == len(original) - got["analysis"].record["rows"] - got["heldout"].record["rows"]


def test_a_capped_rest_keeps_the_other_parts_and_stays_disjoint(tiny_tokenizer, rows_file):
    parts = {"analysis": 120, "heldout": 60}
    full = partition_rows(tiny_tokenizer, str(rows_file), parts, seed=3)
    capped = partition_rows(tiny_tokenizer, str(rows_file), parts, seed=3, rest_limit=50)
    assert all(capped[k].rows == full[k].rows for k in parts)  # the cap changes only the remainder
    rest = capped["rest"]
    assert 50 <= rest.record["tokens"] == _tokens(tiny_tokenizer, rest.rows)
    assert rest.record["tokens"] - max(_tokens(tiny_tokenizer, [r]) for r in rest.rows) < 50
    assert set(rest.rows) < set(full["rest"].rows)


def test_partition_is_fixed_by_the_seed(tiny_tokenizer, rows_file):
    parts = {"a": 100, "b": 50}
    one = partition_rows(tiny_tokenizer, str(rows_file), parts, seed=1)
    again = partition_rows(tiny_tokenizer, str(rows_file), parts, seed=1)
    other = partition_rows(tiny_tokenizer, str(rows_file), parts, seed=2)
    assert all(one[k].rows == again[k].rows for k in one)
    assert any(one[k].rows != other[k].rows for k in one)


def test_too_small_a_set_is_a_clear_error(tiny_tokenizer, rows_file):
    total = _tokens(tiny_tokenizer, [r for r in load_rows(str(rows_file)).rows if r.strip()])
    with pytest.raises(ShearkitError, match=r"rows\.txt.*too few.*analysis.*heldout"):
        partition_rows(tiny_tokenizer, str(rows_file), {"analysis": total // 2, "heldout": total // 2 + 10})
    with pytest.raises(ShearkitError, match="rest"):  # a "rest" entry is the least the remainder must hold
        partition_rows(tiny_tokenizer, str(rows_file), {"analysis": total // 2, "rest": total // 2 + 10})
    with pytest.raises(ShearkitError, match="whole number of tokens"):
        partition_rows(tiny_tokenizer, str(rows_file), {"analysis": -1})
    with pytest.raises(ShearkitError, match="leak the evaluation set"):
        partition_rows(tiny_tokenizer, "wikitext2", {"analysis": 10}, split="test")


def test_windows_are_the_first_disjoint_windows_of_the_part(tiny_tokenizer, rows_file):
    part = partition_rows(tiny_tokenizer, str(rows_file), {"heldout": 64}, seed=0)["heldout"]
    w = windows(tiny_tokenizer, part, 4, 16)
    stream = tokenize_stream(tiny_tokenizer, part.text)
    assert w.shape == (4, 16) and w.flatten().tolist() == stream[:64].tolist()
    with pytest.raises(ShearkitError, match="'heldout'.*fewer than"):
        windows(tiny_tokenizer, part, stream.numel() // 16 + 1, 16)


def test_instruction_records_are_partitioned_by_record(tmp_path):
    recs = [{"instruction": f"say {i}", "input": "", "output": f"{WORDS[i % len(WORDS)]} {i}"} for i in range(40)]
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(recs))
    got = partition_records(str(path), {"heldout": 8, "calib": 5}, seed=4)
    assert [len(got[k]) for k in ("heldout", "calib", "rest")] == [8, 5, 40 - 13]
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert Counter(key(r) for p in got.values() for r in p) == Counter(key(r) for r in recs)
    assert got == partition_records(str(path), {"heldout": 8, "calib": 5}, seed=4)
    assert got["heldout"] != partition_records(str(path), {"heldout": 8, "calib": 5}, seed=5)["heldout"]
    with pytest.raises(ShearkitError, match="inst.json.*40 records.*too few.*heldout 30"):
        partition_records(str(path), {"heldout": 30, "calib": 11})
    capped = partition_records(str(path), {"heldout": 8, "calib": 5}, seed=4, rest_limit=10)
    assert capped["heldout"] == got["heldout"] and len(capped["rest"]) == 10
    assert {key(r) for r in capped["rest"]} < {key(r) for r in got["rest"]}


def test_real_sets_partition_disjointly(tiny_tokenizer, data_dir):
    """The local c4 and alpaca: parts of the sizes dynamic recovery uses never share a row or record."""
    got = partition_rows(tiny_tokenizer, "c4", {"calib": 4096, "heldout": 2048}, seed=0, data_dir=data_dir)
    rows = [r for r in load_rows("c4", "train", data_dir).rows if r.strip()]
    assert Counter(r for p in got.values() for r in p.rows) == Counter(rows)
    assert got["calib"].record["tokens"] >= 4096 and got["heldout"].record["tokens"] >= 2048
    recs = partition_records("alpaca", {"heldout": 32}, seed=0, data_dir=data_dir)
    all_recs = load_instructions("alpaca", data_dir)
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert Counter(key(r) for p in recs.values() for r in p) == Counter(key(r) for r in all_recs)
    assert len(recs["heldout"]) == 32 and len(recs["rest"]) == len(all_recs) - 32
