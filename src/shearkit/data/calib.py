"""Calibration samples: N seeded random windows of L tokens from a tokenised text stream."""
from __future__ import annotations

import os

import torch

from ..errors import ShearkitError
from .sources import DATASETS, load_rows


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenise a whole text once, adding no BOS/EOS (windows are cut from this stream)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer, name: str = "c4", n: int = 64, seqlen: int = 512, seed: int = 0,
                        data_dir: str | os.PathLike | None = None, split: str | None = None) -> torch.Tensor:
    """Draw `n` windows of `seqlen` tokens from the concatenated tokenised text of a data set.

    The stream is cut into disjoint slots of `seqlen` tokens and `n` slots are chosen at random
    with `seed`, so no token appears twice; asking for more windows than the text holds is an
    error rather than silent reuse. Returns a LongTensor of shape (n, seqlen).
    """
    if n <= 0 or seqlen <= 1:
        raise ShearkitError(f"Calibration needs n >= 1 windows of seqlen >= 2 tokens (got n={n}, seqlen={seqlen}).")
    ds = DATASETS.get(name)
    if ds is not None and not ds.calibration_ok:
        split = split or "train"
        if split == ds.default_split:
            raise ShearkitError(f"'{name}' cannot be used for calibration from its {split} split: that would leak "
                                f"the evaluation set. Use --calib c4 or wiki, or add a train split file.")
        try:
            rows = load_rows(name, split, data_dir)
        except ShearkitError as e:
            raise ShearkitError(f"Calibrating on '{name}' needs its train split, which is not available ({e}) — "
                                f"only the test split is present and using it would leak the evaluation set. "
                                f"Use --calib c4 or wiki.") from None
    else:
        rows = load_rows(name, split, data_dir)
    ids = tokenize_stream(tokenizer, rows.text)
    slots = ids.numel() // seqlen
    if slots < n:
        raise ShearkitError(
            f"Too little text in '{name}' for {n} calibration windows of {seqlen} tokens: it holds {ids.numel():,} "
            f"tokens ({slots} windows). Lower --calib-samples or --calib-seqlen, or give a larger --calib file."
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(slots, generator=g)[:n].sort().values
    return ids[: slots * seqlen].view(slots, seqlen)[pick].clone()
