"""Speed and size: parameters, on-disk size, prefill and decode tokens/s, peak memory.

Each model lives in a child process of its own (`memory.ChildWorker`), so its peak memory is its own.
Timings take warm-up runs, then `repeats` timed runs whose median and spread (min, max) are reported.
With several models, the parent takes the children in turn for every repeat (A, B, A, B, ...; only
one runs at a time) so that a noisy, shared machine affects them alike, and ratios come from one run.
Ratios read as the first model over the second (the baseline): above 1 when the first is faster.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..kv_cache import cache_kwarg, new_cache
from .memory import ChildWorker, Measured, PeakMemory, load_model  # noqa: F401 - PeakMemory is imported from here too


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
    cache = {cache_kwarg(model): new_cache(model)}  # filled in place by every forward
    nxt = model(input_ids=ids, use_cache=True, **cache).logits[:, -1:].argmax(-1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(input_ids=nxt, use_cache=True, **cache).logits[:, -1:].argmax(-1)
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


def _given(model):
    """Setup of a child given a model object (which arrived by value)."""
    return model


def _modeling_modules(model: Any, cache_dir: str | None) -> tuple[str, ...]:
    """The transformers modeling module of a model object or of a model directory's config, imported in
    its child before the start figure so that the reported peak holds the model, not the code's import."""
    import importlib.util
    import json

    if isinstance(model, (str, os.PathLike)):
        from ..models.builtin import BUILTINS, builtin_path

        cfg = (builtin_path(str(model), cache_dir) if str(model) in BUILTINS else Path(model)) / "config.json"
        try:
            mt = json.loads(cfg.read_text()).get("model_type", "")
        except (OSError, ValueError):
            return ()
        names = [f"transformers.models.{mt}.modeling_{mt}"]
    else:
        names = [c.__module__ for c in type(model).__mro__ if c.__module__.startswith("transformers.models.")][:1]
    try:
        return tuple(n for n in names if importlib.util.find_spec(n) is not None)
    except (ImportError, ValueError):
        return ()


def _describe(model) -> dict[str, Any]:
    from ..arch import get_adapter

    p = next(model.parameters())
    return {"params": get_adapter(model).param_counts(), "weight_bytes": _weight_bytes(model),
            "vocab": model.config.vocab_size, "dtype": str(p.dtype), "device": str(p.device),
            "threads": torch.get_num_threads()}


def _run_once(model, batch: int, length: int, decode_batch: int, decode_prompt: int, decode_tokens: int,
              vocab: int) -> None:
    """One prefill and one decode run at the benchmark's setting (the work whose peak memory is reported)."""
    time_prefill(model, batch, length, vocab)
    time_decode(model, decode_batch, decode_prompt, decode_tokens, vocab)


def _memory_record(m: Measured) -> dict[str, Any]:
    """The memory figures of one model's child: the reported peak is above the child's start (interpreter,
    torch and the model's code imported, no model), so it counts the weights, activations and KV cache."""
    cuda = m.peak.cuda_allocated is not None
    return {"peak_memory_bytes": m.peak_above("start"),
            "peak_memory_kind": "cuda_max_allocated" if cuda else "child_rss_above_start",
            "memory": {"start_rss_bytes": m.start.rss, "loaded_rss_bytes": m.loaded.rss, "peak_rss_bytes": m.peak.rss,
                       "start_anon_rss_bytes": m.start.anon_rss, "loaded_anon_rss_bytes": m.loaded.anon_rss,
                       "peak_anon_rss_bytes": m.peak.anon_rss, "peak_cuda_allocated_bytes": m.peak.cuda_allocated,
                       "run_peak_above_loaded_bytes": m.peak_above("loaded")}}


def _ratios(a: str, b: str, ra: dict, rb: dict) -> dict[str, Any]:
    """`a` over the baseline `b`: tokens/s ratios (above 1 when `a` is faster), parameter and memory ratios."""
    med = lambda r, k: r[k]["median"]  # noqa: E731
    return {"label": f"{a} / {b}", "model": a, "baseline": b,
            "prefill_speedup": med(ra, "prefill_tokens_per_s") / med(rb, "prefill_tokens_per_s"),
            "decode_speedup": med(ra, "decode_tokens_per_s") / med(rb, "decode_tokens_per_s"),
            "params_ratio": ra["params"]["unique"] / rb["params"]["unique"],
            "memory_ratio": ra["peak_memory_bytes"] / rb["peak_memory_bytes"]}


def benchmark(models: dict[str, Any], *, batch: int = 1, length: int = 512, decode_tokens: int = 32,
              decode_batch: int = 1, decode_prompt: int = 64, warmup: int = 1, repeats: int = 5,
              paths: dict[str, str | None] | None = None, device: str = "auto", dtype: str = "auto",
              cache_dir: str | None = None) -> dict[str, dict]:
    """Measure every model in `models` (label -> model object, or a model name or directory that the
    child loads with `device`, `dtype`, `cache_dir`), each in its own child process, repeats interleaved.

    Returns label -> {params, disk_bytes, prefill (tokens/s stats), decode (tokens/s stats),
    peak_memory_bytes, memory, setting}; with two models also `ratios`: the first over the second.
    """
    paths = paths or {}
    threads = torch.get_num_threads()
    workers: dict[str, ChildWorker] = {}
    try:
        for k, m in models.items():
            setup, args = (load_model, (m, device, dtype, cache_dir)) if isinstance(m, (str, os.PathLike)) \
                else (_given, (m,))
            imports = ("torch", "transformers", *_modeling_modules(m, cache_dir), "shearkit.models", "shearkit.arch")
            workers[k] = ChildWorker(setup, *args, imports=imports, threads=threads, name=k, wait=False)
        info = {k: w.ready().call(_describe) for k, w in workers.items()}  # the children load side by side
        prefill: dict[str, list[float]] = {k: [] for k in models}
        decode: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(warmup):
            for k, w in workers.items():
                w.call(time_prefill, batch, length, info[k]["vocab"])
                w.call(time_decode, decode_batch, decode_prompt, min(4, decode_tokens), info[k]["vocab"])
        for r in range(repeats):
            for k, w in workers.items():
                prefill[k].append(batch * length / w.call(time_prefill, batch, length, info[k]["vocab"], seed=r))
                decode[k].append(decode_batch * decode_tokens / w.call(
                    time_decode, decode_batch, decode_prompt, decode_tokens, info[k]["vocab"], seed=r))
        mem = {k: w.measure(_run_once, batch, length, decode_batch, decode_prompt, decode_tokens, info[k]["vocab"],
                            device=info[k]["device"]) for k, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    results: dict[str, dict] = {}
    for k in models:
        i = info[k]
        results[k] = {
            "params": i["params"],
            "disk_bytes": dir_size(paths.get(k)),
            "prefill_tokens_per_s": _stats(prefill[k]),
            "decode_tokens_per_s": _stats(decode[k]),
            "weight_bytes": i["weight_bytes"],
            **_memory_record(mem[k]),
            "setting": {"batch": batch, "length": length, "decode_batch": decode_batch,
                        "decode_prompt": decode_prompt, "decode_tokens": decode_tokens,
                        "warmup": warmup, "repeats": repeats, "dtype": i["dtype"], "device": i["device"],
                        "threads": i["threads"], "process": "one child process per model"},
        }
    if len(models) == 2:
        a, b = list(models)
        results["ratios"] = _ratios(a, b, results[a], results[b])
    return results


def _times(r: float, faster: str, slower: str) -> str:
    """`r`× in words: 'r× faster than ...' when r ≥ 1, else 'r× the speed of ..., 1/r× slower'."""
    return f"{r:.2f}× {faster}" if r >= 1 else f"{r:.2f}× {slower}, {1 / r:.2f}× slower"


def ratio_lines(ratios: dict[str, Any]) -> list[str]:
    """The `ratios` record of a two-model benchmark in words: the model over its baseline."""
    base = ratios["baseline"]
    lines = [f"{ratios['model']} against {base} (ratios are model / baseline; above 1 means more):"]
    for stage in ("prefill", "decode"):
        lines.append(f"  {stage}: " + _times(ratios[f"{stage}_speedup"], f"faster than {base}",
                                             f"the speed of {base}") + " (model / baseline tokens/s)")
    lines.append(f"  parameters: {ratios['params_ratio']:.2f}× those of {base} (unique parameters)")
    lines.append(f"  peak memory: uses {ratios['memory_ratio']:.2f}× the memory of {base}")
    return lines
