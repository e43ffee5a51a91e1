"""Run llm-compressor's SparseGPT or Wanda modifier on saved calibration tokens (second venv).

This file runs inside the llm-compressor venv (its own transformers / compressed-tensors
pins), never in shearkit's; it imports nothing from shearkit. It is driven by
`bench/compare_llmcompressor.py`:

    /work/venv-llmc/bin/python bench/llmc_worker.py --model DIR --calib calib.safetensors \
        --method sparsegpt|wanda --mask 0:0|2:4 --out OUTDIR

Reads the (n, seqlen) `input_ids` tensor from `--calib`, builds a `datasets.Dataset` from it
(already tokenised, so llm-compressor does no tokenisation), runs `oneshot` with the sequential
pipeline in the windows' order (no shuffling, batch 1, truncation at seqlen: nothing is cut),
times only the `oneshot` call, and writes the pruned decoder weights as plain safetensors
(`OUTDIR/pruned.safetensors`) plus `OUTDIR/result.json` (timing, versions, sparsity).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local safetensors model directory")
    ap.add_argument("--calib", required=True, help="safetensors file holding 'input_ids' (n, seqlen)")
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--mask", default="0:0", help='"0:0" (unstructured) or "N:M" such as "2:4"')
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args(argv)

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ids = load_file(args.calib)["input_ids"].to(torch.long)
    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model)

    # The decoder's linear layers only: every nn.Linear except the (tied) lm_head.
    common = dict(sparsity=args.sparsity, mask_structure=args.mask, targets=["Linear"], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(block_size=args.block_size, dampening_frac=args.damp, **common)
    else:
        recipe = WandaPruningModifier(**common)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
                    shuffle_calibration_samples=False, max_seq_length=seqlen, batch_size=1,
                    pipeline="sequential", output_dir=None)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0

    sd = model.state_dict()
    # lm_head.weight is tied to embed_tokens: store each tensor once (safetensors refuses shared storage).
    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "pruned.safetensors"))

    layers = {}
    zeros = total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            z = int((mod.weight == 0).sum())
            layers[name] = z / mod.weight.numel()
            zeros += z
            total += mod.weight.numel()
    res = {
        "impl": "llm-compressor", "method": args.method, "mask_structure": args.mask, "sparsity_target": args.sparsity,
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "dampening_frac": args.damp if args.method == "sparsegpt" else None,
        "calib_windows": n, "calib_seqlen": seqlen, "prune_wall_s": round(wall, 2), "prune_cpu_s": round(cpu, 2),
        "torch_threads": torch.get_num_threads(), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "achieved_sparsity": zeros / max(total, 1), "layer_sparsity": layers,
        "versions": {p: version(p) for p in ("llmcompressor", "torch", "transformers", "compressed-tensors", "datasets")},
        "python": sys.version.split()[0], "pid": os.getpid(),
    }
    (out / "result.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "layer_sparsity"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
