"""Perplexity with the protocol SparseGPT, Wanda and BESA report (`ppl_concat`).

Protocol: the split's rows joined with the set's joiner (WikiText-2: "\\n\\n", PTB: " "),
tokenised once with no BOS; cut into non-overlapping windows of `seqlen` tokens, the trailing
partial window dropped; each window is scored on its own (no context carried over), and the
result is exp(mean NLL over the seqlen-1 predicted tokens of every window).

Worked example: 5,000 tokens at seqlen 2048 -> windows [0:2048] and [2048:4096]; tokens
4096..4999 are dropped; 2 x 2047 predictions are averaged.
"""
from __future__ import annotations

import math
import os

import torch

from ..batching import Backoff, resolve_batch_size
from ..data import load_rows, tokenize_stream
from ..errors import ShearkitError
from ..progress import progress


def model_max_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int | str | Backoff = 1,
               desc: str | None = "perplexity") -> torch.Tensor:
    """Sum of token NLLs (float32, returned as float64 on the CPU) of each window, predicting tokens
    1..L-1 from their prefix (`desc=None`: no progress bar).

    `batch_size`: windows per forward pass, `auto` (`batching.resolve_batch_size`), or a `Backoff`
    shared between calls. A batch that runs out of memory is scored again in halves (each window's
    sum is its own, so the sums do not depend on how windows are batched beyond the float order of
    batched matrix products). The windows go to the device once and the sums come back once: no
    copy between host and device per batch."""
    device = next(model.parameters()).device
    backoff = batch_size if isinstance(batch_size, Backoff) else Backoff(
        resolve_batch_size(batch_size, windows.shape[0], device), desc or "perplexity", batch_size)
    ids = windows.to(device)

    def score(lo: int, hi: int) -> torch.Tensor:
        batch = ids[lo:hi]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        return nll.view(batch.shape[0], -1).sum(1).double()

    with progress(None, desc, unit="window", total=windows.shape[0]) as bar:
        sums = backoff.map(score, windows.shape[0], on_done=bar.update)
    return torch.cat(sums).cpu()


def eval_windows(tokenizer, dataset: str, seqlen: int, *, split: str | None = None, limit: int | None = None,
                 joiner: str | None = None, data_dir: str | os.PathLike | None = None):
    """The concatenated protocol's windows: the split's rows joined, tokenised once, cut into
    (n, seqlen) windows (the first `limit`). Returns (windows, rows, windows in the whole split);
    every engine scored under the protocol (PyTorch, llama.cpp) takes the same windows from here."""
    rows = load_rows(dataset, split, data_dir, joiner)
    ids = tokenize_stream(tokenizer, rows.text)
    n = ids.numel() // seqlen
    if n == 0:
        raise ShearkitError(f"'{dataset}' holds {ids.numel()} tokens, fewer than one window of {seqlen}.")
    total = n
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen), rows, total


def perplexity(model, tokenizer, dataset: str = "wikitext2", *, split: str | None = None, seqlen: int = 2048,
               batch_size: int | str = "auto", limit: int | None = None, joiner: str | None = None,
               data_dir: str | os.PathLike | None = None) -> dict:
    """Perplexity of `model` on a named data set (or text file) under the concatenated protocol.

    Args:
        dataset: `wikitext2`, `ptb`, another named set, or a text/jsonl path.
        split: the split (default: the set's evaluation split, `test`).
        seqlen: window length; capped at the model's maximum positions.
        limit: score only the first `limit` windows (quick runs); recorded in the result.
        joiner: override how rows are joined (recorded).
        batch_size: windows per forward pass, or `auto`: 1 on the CPU; on an accelerator the largest
            batch (from 64 down, halving) that fits in memory. A fixed size that runs out of memory also
            halves (with a warning in the log). The size used is recorded (`batch_size`).

    Returns:
        A record with `ppl`, `nll`, and the protocol: dataset, split, joiner, seqlen, windows,
        tokens, bos, limit, batch_size (the windows per forward pass used in the end) and
        batch_size_requested.
    """
    if seqlen < 2:
        raise ShearkitError(f"--seqlen must be at least 2, got {seqlen}.")
    if limit is not None and limit < 1:
        raise ShearkitError(f"--limit must be a positive number of windows, got {limit}.")
    cap = model_max_length(model)
    eff = min(seqlen, cap) if cap else seqlen
    windows, rows, total = eval_windows(tokenizer, dataset, eff, split=split, limit=limit, joiner=joiner,
                                        data_dir=data_dir)
    n = windows.shape[0]
    device = next(model.parameters()).device
    backoff = Backoff(resolve_batch_size(batch_size, n, device), f"ppl {rows.record['dataset']}", batch_size)
    sums = window_nll(model, windows, backoff, desc=backoff.what)
    nll = float(sums.sum() / (n * (eff - 1)))
    return {"metric": "ppl_concat", "ppl": math.exp(nll), "nll": nll, **rows.record,
            "seqlen": eff, "seqlen_requested": seqlen, "windows": n, "windows_total": total,
            "tokens_scored": n * (eff - 1), "bos": "none (text tokenised once without special tokens)",
            "limit": limit, "batch_size": backoff.size, "batch_size_requested": batch_size,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
