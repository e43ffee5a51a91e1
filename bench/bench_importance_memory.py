"""Peak memory of importance estimation: LoRAPrune (LoRA gradients) against LLM-Pruner (weight gradients).

    SHEARKIT_DATA=../shared/data python bench/bench_importance_memory.py [--windows 16 --seqlen 256 --batch 4]

Each estimator runs in a fresh child process of its own (`shearkit.eval.memory.measure_in_child`) on
the same calibration windows in the same batches: the child loads SmolLM2-135M, then one pass scores
every KV group and MLP channel (`shearkit.importance.passes`: `taylor_pass` holds a gradient for every
block weight, as our llm-pruner and LLM-Pruner's own code do; `lora_pass` holds the LoRA factors'
gradients and forms `G_hat` one module at a time), each once as published (activations kept for the
backward pass) and once with activation checkpointing (recomputed in the backward pass; the scores are
the same). The figure is the peak above the loaded model, as anonymous RSS (memory the process
allocated; file-backed pages do not count) and as RSS. Writes
bench/results/importance_memory.json; `python bench/tables.py` renders it.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import shearkit
from shearkit.eval.memory import load_model, measure_in_child
from shearkit.importance.passes import lora_pass, taylor_pass
from shearkit.io.atomic import write_json

from cells import machine, today

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "importance_memory.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    a = ap.parse_args()
    _, tok = shearkit.load(a.model, device="cpu")
    from shearkit.data import calibration_windows

    tokens = calibration_windows(tok, "c4", a.windows, a.seqlen, 0, a.data_dir)
    rows = {}
    for name, work, ckpt in (("llm-pruner", taylor_pass, False), ("loraprune", lora_pass, False),
                             ("llm-pruner+ckpt", taylor_pass, True), ("loraprune+ckpt", lora_pass, True)):
        t0 = time.perf_counter()
        m = measure_in_child(work, tokens, a.batch, ckpt, setup=functools.partial(load_model, a.model, "cpu", "float32"),
                             imports=("torch", "transformers", "peft", "shearkit.models"))
        rows[name] = {"checkpointing": ckpt, "anon_peak_above_loaded_bytes": m.anon_peak_above("loaded"),
                      "rss_peak_above_loaded_bytes": m.peak_above("loaded"),
                      "loaded_anon_rss_bytes": m.loaded.anon_rss, "loaded_rss_bytes": m.loaded.rss,
                      "wall_s": time.perf_counter() - t0}
        print(f"{name}: peak above the loaded model {rows[name]['anon_peak_above_loaded_bytes'] / 2**20:,.0f} MiB "
              f"anonymous, {rows[name]['rss_peak_above_loaded_bytes'] / 2**20:,.0f} MiB RSS", flush=True)

    def ratio(a_: str, b_: str) -> float:
        return rows[a_]["anon_peak_above_loaded_bytes"] / rows[b_]["anon_peak_above_loaded_bytes"]

    ratios = {"loraprune / llm-pruner (both without checkpointing)": ratio("loraprune", "llm-pruner"),
              "loraprune / llm-pruner (both with checkpointing)": ratio("loraprune+ckpt", "llm-pruner+ckpt"),
              "loraprune with checkpointing / llm-pruner as published": ratio("loraprune+ckpt", "llm-pruner")}
    write_json(OUT, {"model": a.model, "calib": {"dataset": "c4", "windows": a.windows, "seqlen": a.seqlen,
                                                 "batch": a.batch}, "rows": rows, "ratios_anon": ratios,
                     "machine": machine(), "date": today(),
                     "command": "python bench/bench_importance_memory.py " + " ".join(
                         f"--{k} {v}" for k, v in (("windows", a.windows), ("seqlen", a.seqlen), ("batch", a.batch)))})
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
