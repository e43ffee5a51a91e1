"""Benchmark the unstructured methods on one fixed protocol.

Protocol: calibration 64 x 512 tokens from c4 (seed 0); WikiText-2 and PTB perplexity on the
first 40 windows of 512 tokens. For every (method, sparsity) the base model is reloaded, pruned,
evaluated; wall time of the prune and the process's peak memory during it are recorded.

    SHEARKIT_DATA=... python bench/bench_sparsity.py --methods magnitude,wanda,sparsegpt,besa \
        --ratios 0.5 --out bench/results/sparsity.json [--nm 2:4] [--plot-dir bench/results]

`--memory` instead compares the peak memory of the blockwise path (model on CPU, blocks moved
one at a time to the compute device) with that of a whole-model forward on the device.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import shearkit
from shearkit.data import calibration_windows
from shearkit.eval.perplexity import perplexity
from shearkit.eval.speed import PeakMemory
from shearkit.io.atomic import write_json

PROTOCOL = ("smollm2-135m fp32 CPU; calib c4 64x512 seed 0; ppl_concat seqlen 512 first 40 windows; "
            "OMP_NUM_THREADS=1 on a shared 2-core machine (timings inflated by contention)")


def run_one(model_name, method, ratio, nm, calib, args) -> dict:
    model, tok = shearkit.load(model_name, device=args.device, dtype=args.dtype)
    opts = {"nm": nm} if nm else {}
    if args.batch_size:
        opts["batch_size"] = args.batch_size
    t = time.perf_counter()
    with PeakMemory(next(model.parameters()).device) as pm:
        plan = shearkit.prune(model, tok, method, ratio, calib=calib, **opts)
    wall = time.perf_counter() - t
    row = {"method": method, "ratio": ratio, "nm": nm, "ptb_text": "stripped lines",
           "achieved": plan.ratio_achieved, "prune_s": round(wall, 1),
           "peak_mem_mb": round(pm.peak / 2**20), "optimizer": plan.extra.get("optimizer")}
    for ds in ("wikitext2", "ptb"):
        row[ds] = round(perplexity(model, tok, ds, seqlen=512, limit=args.limit, data_dir=args.data_dir)["ppl"], 3)
    if args.plot_dir:
        from shearkit.sparsity.plot import plot_layer_sparsity

        tag = nm.replace(':', '-') if nm else str(int(ratio * 100))
        plot_layer_sparsity(plan, Path(args.plot_dir) / f"{method}_layer_sparsity_{tag}.png")
        plan.save(Path(args.plot_dir) / f"plan_{method}_{tag}.json")  # bench/tables.py redraws the plot from it
    return row


def memory_compare(model_name, calib, args) -> dict:
    """Compute-device memory: blockwise (model on CPU, one block at a time) vs whole model.

    On CUDA both are measured (max allocated). On CPU there is no separate device memory, so
    the bytes that would sit on the device are counted instead (and labelled as counted).
    """
    from shearkit.arch import get_adapter
    from shearkit.calibration import capture_inputs, walk_blocks

    dev = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = shearkit.load(model_name, device="cpu", dtype=args.dtype)
    ad = get_adapter(model)
    nbytes = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters())  # noqa: E731
    block = max(nbytes(b) for b in ad.layers)
    act = calib.numel() * ad.hidden_size * next(model.parameters()).element_size()
    out = {"device": str(dev), "params_mb": round(nbytes(model) / 2**20), "largest_block_mb": round(block / 2**20),
           "activations_mb": round(act / 2**20)}
    if dev.type != "cuda":
        one = calib.shape[1] * ad.hidden_size * next(model.parameters()).element_size()
        out.update({"measured": False,
                    "blockwise_device_mb": round((block + 2 * act) / 2**20),
                    "blockwise_offloaded_device_mb": round((block + 2 * one) / 2**20),
                    "whole_model_device_mb": round(nbytes(model) / 2**20)})
        return out
    with PeakMemory(dev) as pm:
        walk_blocks(model, capture_inputs(model, calib, device=dev))
    out["blockwise_device_mb"] = round(pm.peak / 2**20)
    with PeakMemory(dev) as pm:
        walk_blocks(model, capture_inputs(model, calib, device=dev, offload_activations=True))
    out["blockwise_offloaded_device_mb"] = round(pm.peak / 2**20)
    with PeakMemory(dev) as pm:
        model.to(dev)
        with torch.no_grad():
            for i in range(calib.shape[0]):
                model(input_ids=calib[i:i + 1].to(dev), use_cache=False)
    out.update({"measured": True, "whole_model_device_mb": round(pm.peak / 2**20)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt,besa")
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--nm", default=None)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    ap.add_argument("--out", default="bench/results/sparsity.json")
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    _, tok = shearkit.load(args.model, device="cpu")
    calib = calibration_windows(tok, "c4", 64, 512, 0, args.data_dir)
    rows = []
    if args.memory:
        rows.append(memory_compare(args.model, calib, args))
    else:
        for method in args.methods.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                row = run_one(args.model, method, ratio, args.nm, calib, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(args.out)  # {"protocol", "rows": prune rows, "memory": --memory records}; new rows appended
    prev = json.loads(out.read_text()) if out.exists() else {"protocol": PROTOCOL, "rows": [], "memory": []}
    prev["memory" if args.memory else "rows"] += rows
    write_json(out, prev)


if __name__ == "__main__":
    main()
