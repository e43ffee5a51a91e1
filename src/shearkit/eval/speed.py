"""Speed and size: parameters, on-disk size, prefill and decode tokens/s, peak memory.

Timings take warm-up runs, then `repeats` timed runs whose median and spread (min, max) are
reported. With several models, the repeats are interleaved (A, B, A, B, ...) so that a noisy,
shared machine affects both alike, and ratios come from one run.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch


class PeakMemory:
    """Peak memory during a block: CUDA max allocated, or on CPU the peak process RSS sampled
    every few milliseconds by a background thread."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def poll():
                while not self._stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_prefill(model, batch: int, length: int, vocab: int, seed: int = 0) -> float:
    """Seconds for one forward pass over a (batch, length) block of random tokens."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    _sync(device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def time_decode(model, batch: int, prompt: int, new_tokens: int, vocab: int, seed: int = 0) -> float:
    """Seconds for `new_tokens` greedy decode steps with the KV cache (the prefill not counted)."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
    out = model(input_ids=ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t


def dir_size(path: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files (safetensors/bin/gguf) in a model directory or file."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf"))


def _weight_bytes(model) -> int:
    """Bytes of the model's unique parameters and buffers (what it holds in memory at rest)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def benchmark(models: dict[str, Any], *, batch: int = 1, length: int = 512, decode_tokens: int = 32,
              decode_batch: int = 1, decode_prompt: int = 64, warmup: int = 1, repeats: int = 5,
              paths: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Measure every model in `models` (label -> model), interleaving the repeats.

    Returns label -> {params, disk_bytes, prefill (tokens/s stats), decode (tokens/s stats),
    peak_memory_bytes, setting}.
    """
    from ..arch import get_adapter

    paths = paths or {}
    results: dict[str, dict] = {}
    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    peaks: dict[str, int] = {k: 0 for k in models}
    vocab = {k: m.config.vocab_size for k, m in models.items()}
    for _ in range(warmup):
        for k, m in models.items():
            time_prefill(m, batch, length, vocab[k])
            time_decode(m, decode_batch, decode_prompt, min(4, decode_tokens), vocab[k])
    for r in range(repeats):
        for k, m in models.items():
            device = next(m.parameters()).device
            with PeakMemory(device) as pm:
                prefill[k].append(batch * length / time_prefill(m, batch, length, vocab[k], seed=r))
            peaks[k] = max(peaks[k], pm.peak)
            decode[k].append(decode_batch * decode_tokens / time_decode(m, decode_batch, decode_prompt,
                                                                        decode_tokens, vocab[k], seed=r))
    for k, m in models.items():
        results[k] = {
            "params": get_adapter(m).param_counts(),
            "disk_bytes": dir_size(paths.get(k)),
            "prefill_tokens_per_s": _stats(prefill[k]),
            "decode_tokens_per_s": _stats(decode[k]),
            "weight_bytes": _weight_bytes(m),
            "peak_memory_bytes": peaks[k],  # on CPU: the process's RSS peak, shared by models measured together
            "peak_memory_kind": "cuda_max_allocated" if next(m.parameters()).is_cuda else "process_rss",
            "setting": {"batch": batch, "length": length, "decode_batch": decode_batch,
                        "decode_prompt": decode_prompt, "decode_tokens": decode_tokens,
                        "warmup": warmup, "repeats": repeats, "dtype": str(next(m.parameters()).dtype),
                        "device": str(next(m.parameters()).device), "threads": torch.get_num_threads()},
        }
    if len(models) == 2:
        a, b = list(models)
        results["ratios"] = {
            "label": f"{b} / {a}",
            "prefill_speedup": results[b]["prefill_tokens_per_s"]["median"] / results[a]["prefill_tokens_per_s"]["median"],
            "decode_speedup": results[b]["decode_tokens_per_s"]["median"] / results[a]["decode_tokens_per_s"]["median"],
            "params_ratio": results[b]["params"]["unique"] / results[a]["params"]["unique"],
        }
    return results
