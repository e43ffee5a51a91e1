"""Structured pruning on the built-in model: quality before/after recovery, and real speed-ups.

    SHEARKIT_DATA=../shared/data python bench/bench_structured.py --ratios 0.2,0.5 --recover 50

For each ratio: `shearkit run` with LLM-Pruner (calibration from c4), WikiText-2 and PTB perplexity
(seqlen 512, first --limit windows) of the dense, pruned and recovered model; LoRA recovery on
Alpaca for a fixed budget (steps x batch x seqlen tokens); then prefill and decode tokens/s of the
saved pruned model against the dense one, measured interleaved in one run, and the ideal speed-up
(ratio of forward FLOPs per token, see shearkit/eval/flops.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import shearkit
from shearkit.eval.flops import forward_flops_per_token
from shearkit.pipeline import run_pipeline
from shearkit.recipe import parse_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="llm-pruner")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--recover", type=int, default=50, help="recovery steps (batch 4 x 256 tokens each)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/out/structured")
    a = ap.parse_args()
    rows = []
    for ratio in [float(x) for x in a.ratios.split(",")]:
        recipe = parse_recipe({
            "model": {"name": "smollm2-135m", "device": "cpu"},
            "calib": {"dataset": "c4", "samples": 16, "seqlen": 512, "seed": 0},
            "prune": {"method": a.method, "ratio": ratio},
            "recover": {"steps": a.recover, "data": "alpaca", "seqlen": 256, "batch_size": 4},
            "eval": {"tasks": ["wikitext2", "ptb"], "seqlen": 512, "limit": a.limit},
        })
        run_dir = Path(a.out) / f"{a.method}-{ratio:g}"
        m = run_pipeline(recipe, out=str(run_dir), overwrite=True, command="bench")
        dense, _ = shearkit.load("smollm2-135m", device="cpu")
        pruned, _ = shearkit.load(run_dir / "model", device="cpu")
        speed = shearkit.bench(pruned, dense, labels=["pruned", "dense"], batch=a.batch, length=a.length,
                               repeats=a.repeats, decode_tokens=32)  # ratios: pruned / dense
        fd, fp = (forward_flops_per_token(x, a.length)["total"] for x in (dense, pruned))
        row = {"method": a.method, "ratio": ratio, "ratio_achieved": m["prune"]["ratio_achieved"],
               "prune_s": m["prune"]["wall_s"], "prune_peak_mib": m["prune"]["peak_memory_bytes"] / 2**20,
               "recover_tokens": m.get("recover", {}).get("budget", {}).get("tokens"), "recover_s": m.get("recover", {}).get("wall_s"),
               **{f"{stage}_{t}": m[stage]["tasks"][t]["value"] for stage in ("dense", "pruned") for t in ("wikitext2", "ptb")},
               **{f"recovered_{t}": m["tasks"][t]["value"] for t in ("wikitext2", "ptb")},
               "params_dense": speed["dense"]["params"], "params_pruned": speed["pruned"]["params"],
               "prefill_speedup": speed["ratios"]["prefill_speedup"], "decode_speedup": speed["ratios"]["decode_speedup"],
               "ideal_speedup": fd / fp, "prefill_tok_s_dense": speed["dense"]["prefill_tokens_per_s"],
               "prefill_tok_s_pruned": speed["pruned"]["prefill_tokens_per_s"],
               "weight_mib_dense": speed["dense"]["weight_bytes"] / 2**20,
               "weight_mib_pruned": speed["pruned"]["weight_bytes"] / 2**20,
               "peak_mib_dense": speed["dense"]["peak_memory_bytes"] / 2**20,
               "peak_mib_pruned": speed["pruned"]["peak_memory_bytes"] / 2**20,
               "setting": speed["dense"]["setting"], "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        Path(a.out, "results.json").write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
