"""Disjoint slices of one data set, cut by rows (documents) or records, never by windows.

A method that takes several slices of the same local set (held-out windows for an analysis,
calibration windows, a held-out slice per recovery source, training windows) must not let any
text appear in two of them, whatever sequence length each slice is later cut at. So the set's
rows are put in a seeded permutation and handed to the named parts in the order given, each
taking rows until it holds at least the tokens (or records) it asked for; the part "rest"
(always returned) gets every row left over. Blank rows carry no text and belong to no part.
"""
from __future__ import annotations

import os

import torch

from ..errors import ShearkitError
from .calib import tokenize_stream
from .sources import DATASETS, TextRows, load_instructions, load_rows

REST = "rest"


def _order(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) (the order rows are handed out in)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _check_parts(parts: dict[str, int], unit: str) -> None:
    bad = {k: v for k, v in parts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0}
    if bad:
        raise ShearkitError(f"Every part needs a whole number of {unit} >= 0; got {bad}.")


def _assign(sizes: list[int], order: list[int], parts: dict[str, int]) -> dict[str, list[int]]:
    """Hand items (in `order`) to the parts in turn until each holds `parts[name]` units (item i
    weighs `sizes[i]`); returns {part: item indices, "rest": the items left}."""
    out: dict[str, list[int]] = {}
    pos = 0
    for name, need in parts.items():
        if name == REST:
            continue
        got, idx = 0, []
        while got < need and pos < len(order):
            idx.append(order[pos])
            got += sizes[order[pos]]
            pos += 1
        out[name] = idx
    out[REST] = order[pos:]
    return out


def _shortfall(what: str, parts: dict[str, int], held: int, unit: str) -> ShearkitError:
    asked = ", ".join(f"{k} {v:,}" for k, v in parts.items())
    return ShearkitError(f"{what} holds {held:,} {unit}, too few for the disjoint parts asked for ({asked}; "
                         f"{sum(parts.values()):,} in all). Ask for smaller parts (fewer or shorter windows, "
                         "fewer examples) or give a larger data set.")


def _text_rows(name: str, split: str | None, data_dir) -> TextRows:
    """The set's rows to partition; an evaluation set's test split is refused (it would leak)."""
    ds = DATASETS.get(name)
    if ds is not None and ds.kind == "eval":
        split = split or "train"
        if split == ds.default_split:
            raise ShearkitError(f"Cutting slices out of '{name}' {split} would leak the evaluation set; use c4 or "
                                "wiki, or a train split.")
    return load_rows(name, split, data_dir)


def partition_rows(tokenizer, name: str, parts: dict[str, int], *, seed: int = 0, split: str | None = None,
                   data_dir: str | os.PathLike | None = None) -> dict[str, TextRows]:
    """Split a text set's rows into disjoint parts of at least `parts[part]` tokens each, plus "rest".

    `parts` maps part names to the tokens each needs (in the order the parts are filled); a
    "rest" entry there is the least the remainder must hold. Each part's record says which set,
    part, seed, rows and tokens it holds.

    Raises:
        ShearkitError: the set holds too little text for the parts, or a part size is invalid.
    """
    _check_parts(parts, "tokens")
    rows = _text_rows(name, split, data_dir)
    keep = [i for i, r in enumerate(rows.rows) if r.strip()]
    texts = [rows.rows[i] for i in keep]
    sizes = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]]
    what = f"Data set '{name}' ({len(texts):,} rows)"
    assigned = _assign(sizes, _order(len(texts), seed), parts)
    out: dict[str, TextRows] = {}
    for part, idx in assigned.items():
        got = sum(sizes[i] for i in idx)
        if got < parts.get(part, 0):
            raise _shortfall(what, parts, sum(sizes), "tokens")
        out[part] = TextRows([texts[i] for i in sorted(idx)], rows.joiner,
                             {**rows.record, "part": part, "seed": seed, "rows": len(idx), "tokens": got,
                              "parts": dict(parts)})
    return out


def windows(tokenizer, rows: TextRows, n: int, seqlen: int) -> torch.Tensor:
    """The first `n` disjoint windows of `seqlen` tokens of a part's token stream: (n, seqlen) LongTensor."""
    if n < 1 or seqlen < 2:
        raise ShearkitError(f"Windows need n >= 1 and seqlen >= 2 (got n={n}, seqlen={seqlen}).")
    ids = tokenize_stream(tokenizer, rows.text)
    if ids.numel() < n * seqlen:
        part = rows.record.get("part", "?")
        raise ShearkitError(f"Part '{part}' of '{rows.record.get('dataset', '?')}' holds {ids.numel():,} tokens, "
                            f"fewer than {n} windows of {seqlen}; give that part more tokens or ask for fewer or "
                            "shorter windows.")
    return ids[: n * seqlen].view(n, seqlen).clone()


def partition_records(name: str, parts: dict[str, int], *, seed: int = 0,
                      data_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """Split an instruction set's records into disjoint parts of `parts[part]` records each, plus "rest"
    (a "rest" entry in `parts` is the least the remainder must hold)."""
    _check_parts(parts, "records")
    recs = load_instructions(name, data_dir)
    if sum(parts.values()) > len(recs):
        raise _shortfall(f"Instruction set '{name}'", parts, len(recs), "records")
    assigned = _assign([1] * len(recs), _order(len(recs), seed), parts)
    return {part: [recs[i] for i in sorted(idx)] for part, idx in assigned.items()}
