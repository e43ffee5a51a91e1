"""shearkit's GGUF files run in llama.cpp itself (through llama-cpp-python, an optional dependency):
its logits, its perplexity under shearkit's protocol, and its prefill and decode times, so that the
export is checked and measured by the engine people deploy with, not only by our own reader."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from ..errors import ShearkitError

INSTALL_HINT = ("llama-cpp-python is not installed: `pip install llama-cpp-python==0.3.36` builds it from source; "
                "docs/export.md gives the CMAKE_ARGS for CPUs without AVX-512 or with AMX disabled.")


def require_llama_cpp():
    """The llama_cpp module, or a clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ShearkitError(INSTALL_HINT) from e
    return llama_cpp


def open_gguf(path: str | os.PathLike, *, n_ctx: int = 512, threads: int = 1, logits_all: bool = False):
    """A llama.cpp model on `path` with a context of `n_ctx` tokens evaluated in one batch, on `threads`
    threads; `logits_all` keeps every position's logits (perplexity, comparisons), else only the last."""
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all, verbose=False)


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), vocab) for one sequence from an empty cache (`logits_all` model)."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def perplexity(llm, windows: torch.Tensor) -> dict[str, float]:
    """Perplexity of the (n, seqlen) `windows` (from `eval.perplexity.eval_windows`) with llama.cpp's
    logits: each window from an empty cache, every next token scored, as shearkit scores them."""
    total, count = 0.0, 0
    for w in windows.tolist():
        out = torch.from_numpy(logits(llm, w))
        total += float(torch.nn.functional.cross_entropy(out[:-1], torch.tensor(w[1:]), reduction="sum"))
        count += len(w) - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "windows": windows.shape[0],
            "tokens_scored": count}


def time_prefill(llm, ids: list[int]) -> float:
    """Seconds llama.cpp takes to evaluate `ids` in one batch from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(ids))
    return time.perf_counter() - t0


def time_decode(llm, prompt: list[int], tokens: list[int]) -> float:
    """Seconds llama.cpp takes to evaluate `tokens` one at a time after `prompt` (the prompt not timed)."""
    llm.reset()
    llm.eval(list(prompt))
    t0 = time.perf_counter()
    for t in tokens:
        llm.eval([t])
    return time.perf_counter() - t0
