"""Structured pruning on the built-in model: quality before/after recovery, and real speed-ups.

    SHEARKIT_DATA=../shared/data python bench/bench_structured.py --ratios 0.2,0.5 --recover 30 --tasks wikitext2

For each ratio: the prune pipeline with LLM-Pruner (16 calibration windows of 512 tokens from c4),
perplexity (seqlen 512, first --limit windows) of the dense, pruned and recovered model; LoRA
recovery on Alpaca for a fixed budget (steps x batch 4 x <=256 tokens); then prefill and decode
tokens/s of the saved pruned model against the dense one (each in a child process of its own, repeats
interleaved), and the ideal speed-up (ratio of forward FLOPs per token, see shearkit/eval/flops.py). Each ratio's row
merges into bench/results/structured.json as soon as it is measured; `python bench/tables.py`
renders the file into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import shearkit
from shearkit.eval.flops import forward_flops_per_token
from shearkit.io.atomic import write_json
from shearkit.pipeline import run_pipeline
from shearkit.recipe import parse_recipe


def save_row(path: Path, row: dict) -> None:
    """Merge one row into the results file, replacing an earlier row of the same method and ratio."""
    rows = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in rows if (r["method"], r["ratio"]) != (row["method"], row["ratio"])] + [row]
    write_json(path, sorted(rows, key=lambda r: (r["method"], r["ratio"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="llm-pruner")
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--recover", type=int, default=30, help="recovery steps (batch 4 x <=256 tokens each)")
    ap.add_argument("--tasks", default="wikitext2,ptb")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="bench/out/structured")
    ap.add_argument("--out", default="bench/results/structured.json")
    a = ap.parse_args()
    tasks = a.tasks.split(",")
    for ratio in [float(x) for x in a.ratios.split(",")]:
        recipe = parse_recipe({
            "model": {"name": "smollm2-135m", "device": "cpu", "dtype": "float32"},
            "calib": {"dataset": "c4", "samples": 16, "seqlen": 512, "seed": 0},
            "prune": {"method": a.method, "ratio": ratio},
            "recover": {"steps": a.recover, "data": "alpaca", "seqlen": 256, "batch_size": 4, "lr": 2e-4, "rank": 8},
            "eval": {"tasks": tasks, "seqlen": 512, "limit": a.limit},
        })
        run_dir = Path(a.workdir) / f"{a.method}-{ratio:g}"
        m = run_pipeline(recipe, out=str(run_dir), overwrite=True, command="bench")
        dense, _ = shearkit.load("smollm2-135m", device="cpu", dtype="float32")
        pruned, _ = shearkit.load(run_dir / "model", device="cpu", dtype="float32")
        speed = shearkit.bench(dense, pruned, labels=["dense", "pruned"], batch=a.batch, length=a.length,
                               repeats=a.repeats, decode_tokens=32)
        median = lambda label, what: speed[label][f"{what}_tokens_per_s"]["median"]  # noqa: E731
        fd, fp = (forward_flops_per_token(x, a.length)["total"] for x in (dense, pruned))
        rec = m.get("recover", {})
        row = {"method": a.method, "ratio": ratio, "ratio_achieved": m["prune"]["ratio_achieved"],
               "tasks": tasks, "limit": a.limit, "eval_seqlen": 512, "ptb_text": "stripped lines", "calib": "c4 16x512 seed 0",
               "prune_s": m["prune"]["wall_s"], "prune_peak_mib": m["prune"]["peak_memory_bytes"] / 2**20,
               "recover_steps": a.recover, "recover_budget": rec.get("budget"), "recover_s": rec.get("wall_s"),
               "recover_loss_first": rec.get("loss_first"), "recover_loss_last": rec.get("loss_last"),
               "ppl": {stage: {t: src[t]["value"] for t in tasks}
                       for stage, src in (("dense", m["dense"]["tasks"]), ("pruned", m["pruned"]["tasks"]),
                                          ("recovered", m["tasks"]))},
               "params_dense": speed["dense"]["params"], "params_pruned": speed["pruned"]["params"],
               "ideal_speedup": fd / fp,
               "prefill_speedup": median("pruned", "prefill") / median("dense", "prefill"),
               "decode_speedup": median("pruned", "decode") / median("dense", "decode"),
               "prefill_tok_s_dense": speed["dense"]["prefill_tokens_per_s"],
               "prefill_tok_s_pruned": speed["pruned"]["prefill_tokens_per_s"],
               "weight_mib_dense": speed["dense"]["weight_bytes"] / 2**20,
               "weight_mib_pruned": speed["pruned"]["weight_bytes"] / 2**20,
               "setting": speed["dense"]["setting"], "loadavg": os.getloadavg(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
               "date": time.strftime("%Y-%m-%d")}
        save_row(Path(a.out), row)
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
