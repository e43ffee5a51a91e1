"""Dense baseline of the built-in model: perplexity (quick and full), size, speed, memory, timings.

    SHEARKIT_DATA=../shared/data python bench/bench_dense.py --part ppl   --out bench/out/dense_ppl.json
    SHEARKIT_DATA=../shared/data python bench/bench_dense.py --part speed --out bench/out/dense_speed.json

Prints a markdown table; docs/benchmarks.md holds the figures with the command, machine and date.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import shearkit


def measure_ppl(model, tok, quick_limit: int) -> list[dict]:
    """Quick variants first, then the full test splits from the shortest run to the longest, each row
    printed as soon as it is measured (so an interrupted run still leaves its finished rows)."""
    rows = []
    order = [(s, t, quick_limit) for s in (512, 2048) for t in ("wikitext2", "ptb")]
    order += [(512, "ptb", None), (2048, "ptb", None), (512, "wikitext2", None), (2048, "wikitext2", None)]
    for seqlen, task, limit in order:
        t = time.perf_counter()
        r = shearkit.evaluate(model, tok, [task], seqlen=seqlen, limit=limit)[task]
        rows.append({"task": task, "seqlen": seqlen, "limit": limit, "windows": r["windows"],
                     "ppl": r["ppl"], "eval_s": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--part", choices=["ppl", "speed", "all"], default="all")
    ap.add_argument("--quick-limit", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/out/dense.json")
    a = ap.parse_args()

    t = time.perf_counter()
    model, tok = shearkit.load(a.model, device="auto", dtype="auto")
    result = {"model": a.model, "load_s": time.perf_counter() - t, "machine": platform.platform(),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "params": shearkit.get_adapter(model).param_counts()}
    if a.part in ("speed", "all"):
        result["speed"] = shearkit.bench(model, labels=[a.model], batch=a.batch, length=a.length,
                                         repeats=a.repeats, decode_tokens=32)[a.model]
        print(json.dumps({"speed": result["speed"]}, default=str), flush=True)
    if a.part in ("ppl", "all"):
        result["ppl"] = measure_ppl(model, tok, a.quick_limit)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"| load | {result['load_s']:.1f} s |")
    for r in result.get("ppl", []):
        print(f"| {r['task']} | {r['seqlen']} | {r['windows']} | {r['ppl']:.3f} | {r['eval_s']:.0f} s |")
    if "speed" in result:
        s = result["speed"]
        print(f"| prefill {a.batch}x{a.length} | {s['prefill_tokens_per_s']['median']:.0f} tok/s "
              f"({s['prefill_tokens_per_s']['min']:.0f}-{s['prefill_tokens_per_s']['max']:.0f}) |")
        print(f"| decode | {s['decode_tokens_per_s']['median']:.1f} tok/s |")
        print(f"| peak memory | {s['peak_memory_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
