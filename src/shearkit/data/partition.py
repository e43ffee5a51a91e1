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


def _assign(size, order: list[int], parts: dict[str, int], rest_limit: int | None = None) -> dict[str, list[int]]:
    """Hand items (in `order`) to the parts in turn until each holds `parts[name]` units (`size(pos)`:
    the weight of the item at position `pos` of `order`); returns {part: item indices, "rest": the
    items left, or with `rest_limit` only the first ones holding at least that many units}."""
    out: dict[str, list[int]] = {}
    pos = 0

    def take(need: int) -> list[int]:
        nonlocal pos
        got, idx = 0, []
        while got < need and pos < len(order):
            idx.append(order[pos])
            got += size(pos)
            pos += 1
        return idx

    for name, need in parts.items():
        if name != REST:
            out[name] = take(need)
    out[REST] = order[pos:] if rest_limit is None else take(rest_limit)
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
                   data_dir: str | os.PathLike | None = None, rest_limit: int | None = None) -> dict[str, TextRows]:
    """Split a text set's rows into disjoint parts of at least `parts[part]` tokens each, plus "rest".

    `parts` maps part names to the tokens each needs (in the order the parts are filled); a
    "rest" entry there is the least the remainder must hold; `rest_limit` caps the remainder at
    the first rows holding that many tokens (the others are left out: a training budget needs no
    more, and rows are only tokenised as far as they are handed out). Each part's record says
    which set, part, seed, rows and tokens it holds.

    Raises:
        ShearkitError: the set holds too little text for the parts, or a part size is invalid.
    """
    _check_parts(parts, "tokens")
    rows = _text_rows(name, split, data_dir)
    texts = [r for r in rows.rows if r.strip()]
    order = _order(len(texts), seed)
    sizes: list[int] = []

    def size(pos: int) -> int:  # tokenised in chunks, in hand-out order, as far as needed
        while pos >= len(sizes):
            chunk = [texts[i] for i in order[len(sizes): len(sizes) + 512]]
            sizes.extend(len(ids) for ids in tokenizer(chunk, add_special_tokens=False,
                                                       return_attention_mask=False)["input_ids"])
        return sizes[pos]

    if rest_limit is not None:
        rest_limit = max(rest_limit, parts.get(REST, 0))
    assigned = _assign(size, order, parts, rest_limit)
    at = {i: pos for pos, i in enumerate(order)}
    out: dict[str, TextRows] = {}
    for part, idx in assigned.items():
        got = sum(size(at[i]) for i in idx)
        if got < parts.get(part, 0):
            total = sum(size(p) for p in range(len(order)))
            raise _shortfall(f"Data set '{name}' ({len(texts):,} rows)", parts, total, "tokens")
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
                      data_dir: str | os.PathLike | None = None, rest_limit: int | None = None) -> dict[str, list[dict]]:
    """Split an instruction set's records into disjoint parts of `parts[part]` records each, plus "rest"
    (a "rest" entry in `parts` is the least the remainder must hold; `rest_limit` caps it)."""
    _check_parts(parts, "records")
    recs = load_instructions(name, data_dir)
    if sum(parts.values()) > len(recs):
        raise _shortfall(f"Instruction set '{name}'", parts, len(recs), "records")
    if rest_limit is not None:
        rest_limit = max(rest_limit, parts.get(REST, 0))
    assigned = _assign(lambda pos: 1, _order(len(recs), seed), parts, rest_limit)
    return {part: [recs[i] for i in sorted(idx)] for part, idx in assigned.items()}
