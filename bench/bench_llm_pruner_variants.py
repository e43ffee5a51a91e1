"""LLM-Pruner's allocation and attention-unit variants at one ratio, from one gradient pass.

    SHEARKIT_DATA=../shared/data python bench/bench_llm_pruner_variants.py --ratio 0.2

Protocol: the built-in model, float32 on CPU; 16 calibration windows of 512 tokens from `c4`
(seed 0); no recovery; WikiText-2 `ppl_concat` at seqlen 512 on the first 8 windows. The Taylor
gradients are computed once and reused for every llm-pruner variant (each variant prunes a fresh
copy of the same base model, so the gradients are those of its weights); `structured-magnitude`
needs none. Writes bench/results/llm_pruner_variants.json; `python bench/tables.py` renders it.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

import shearkit
from shearkit.data import calibration_windows
from shearkit.io.atomic import write_json
from shearkit.methods import llm_pruner

# (label, method, options): the dense-layer defaults are llm-pruner's (first 4 / last 2 of 32, scaled)
VARIANTS = [
    ("llm-pruner default (global, KV groups, dense first/last layers)", "llm-pruner", {}),
    ("global, MLP channels only", "llm-pruner", {"attn_unit": "none"}),
    ("global, equal query heads per KV head", "llm-pruner", {"attn_unit": "query_heads"}),
    ("global, no dense layers", "llm-pruner", {"dense_first": 0, "dense_last": 0}),
    ("uniform, KV groups, dense layers", "llm-pruner", {"allocation": "uniform"}),
    ("uniform, query heads, dense layers", "llm-pruner", {"allocation": "uniform", "attn_unit": "query_heads"}),
    ("uniform, MLP only, dense layers", "llm-pruner", {"allocation": "uniform", "attn_unit": "none"}),
    ("uniform, no dense layers", "llm-pruner", {"allocation": "uniform", "dense_first": 0, "dense_last": 0}),
    ("structured-magnitude (uniform, no dense layers)", "structured-magnitude", {}),
]


def cache_gradient_pass() -> dict:
    """Make llm-pruner reuse the first gradient pass for identical calibration tokens."""
    original, memo = llm_pruner.collect_stats, {}

    def cached(model, tokens, **kw):
        key = (tokens.data_ptr(), tuple(tokens.shape), tuple(sorted(kw.items())))
        if key not in memo:
            t = time.perf_counter()
            memo[key] = original(model, tokens, **kw)
            memo["grad_pass_s"] = time.perf_counter() - t
        return memo[key]

    llm_pruner.collect_stats = cached
    return memo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    ap.add_argument("--out", default="bench/results/llm_pruner_variants.json")
    a = ap.parse_args()
    memo = cache_gradient_pass()
    base, tok = shearkit.load(a.model, device="cpu", dtype="float32")
    calib = calibration_windows(tok, "c4", 16, 512, 0, a.data_dir)
    dense = shearkit.evaluate(base, tok, ["wikitext2"], seqlen=512, limit=a.limit, data_dir=a.data_dir)["wikitext2"]
    result = {"protocol": {"model": a.model, "dtype": "float32", "device": "cpu", "calib": "c4", "calib_samples": 16,
                           "calib_seqlen": 512, "seed": 0, "ratio": a.ratio, "eval": "wikitext2", "eval_seqlen": 512,
                           "limit": a.limit, "recovery": None},
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
              "date": time.strftime("%Y-%m-%d"), "dense_wikitext2": dense["ppl"], "rows": []}
    for label, method, opts in VARIANTS:
        model = copy.deepcopy(base)
        plan = shearkit.prune(model, tok, method, a.ratio, calib=calib, **opts)
        ppl = shearkit.evaluate(model, tok, ["wikitext2"], seqlen=512, limit=a.limit, data_dir=a.data_dir)["wikitext2"]
        row = {"label": label, "method": method, "options": opts, "config": plan.config,
               "ratio_achieved": plan.ratio_achieved, "export": plan.extra.get("export"), "wikitext2": ppl["ppl"]}
        result["rows"].append(row)
        result["grad_pass_s"] = memo.get("grad_pass_s")
        write_json(a.out, result)  # after every variant, so an interrupted run keeps its finished rows
        print(row["label"], f"{row['ratio_achieved']:.5f}", f"{row['wikitext2']:.2f}", row["export"], flush=True)
        del model


if __name__ == "__main__":
    main()
