"""Peak memory of importance estimation: LoRAPrune (LoRA gradients) against LLM-Pruner (weight gradients).

    SHEARKIT_DATA=../shared/data python bench/bench_importance_memory.py [--windows 16 --seqlen 256 --batch 4]

Each estimator runs in a fresh child process of its own (`shearkit.eval.memory.measure_in_child`) on
the same calibration windows in the same batches: the child loads SmolLM2-135M, then one pass scores
every KV group and MLP channel (`shearkit.importance.passes`: `taylor_pass` holds a gradient for every
block weight, as our llm-pruner and LLM-Pruner's own code do; `lora_pass` holds the LoRA factors'
gradients and forms `G_hat` one module at a time). Two settings of each: "as published" (activations
and the full-vocabulary logits kept for the backward pass) and "lean" (activation checkpointing and the
output head on `--loss-chunk` tokens at a time, `shearkit.arch.lm_head`; the scores are the same).
Each setting runs under two malloc configurations: glibc's default, and `MALLOC_MMAP_THRESHOLD_`
(`--mmap-threshold` bytes: every allocation at least that large gets its own mapping and goes back
to the system when freed), since on CPU the heap's fragmentation, not the live tensors, decides the
default peak. The figure is the peak above the loaded model, as anonymous RSS (memory the process
allocated; file-backed pages do not count) and as RSS. Writes bench/results/importance_memory.json;
`python bench/tables.py` renders it.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from contextlib import contextmanager
from pathlib import Path

import shearkit
from shearkit.eval.memory import load_model, measure_in_child
from shearkit.importance.passes import lora_pass, taylor_pass
from shearkit.io.atomic import write_json

from cells import machine, today

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "importance_memory.json"


@contextmanager
def child_env(env: dict[str, str]):
    """Environment variables set for the child processes started inside (glibc reads them at start)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loss-chunk", type=int, default=256, help="tokens per output-head chunk in the lean setting")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20, help="MALLOC_MMAP_THRESHOLD_ of the second runs")
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    a = ap.parse_args()
    _, tok = shearkit.load(a.model, device="cpu")
    from shearkit.data import calibration_windows

    tokens = calibration_windows(tok, "c4", a.windows, a.seqlen, 0, a.data_dir)
    rows = {}
    settings = (("llm-pruner", "as published", taylor_pass, False, 0), ("loraprune", "as published", lora_pass, False, 0),
                ("llm-pruner", "lean", taylor_pass, True, a.loss_chunk),
                ("loraprune", "lean", lora_pass, True, a.loss_chunk))
    for alloc in ("glibc default", f"mmap threshold {a.mmap_threshold}"):
        for method, setting, work, ckpt, chunk in settings:
            name = f"{method}, {setting}, {alloc}"
            env = {} if alloc == "glibc default" else {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)}
            t0 = time.perf_counter()
            with child_env(env):
                m = measure_in_child(functools.partial(work, loss_chunk=chunk), tokens, a.batch, ckpt,
                                     setup=functools.partial(load_model, a.model, "cpu", "float32"),
                                     imports=("torch", "transformers", "peft", "shearkit.models"))
            rows[name] = {"method": method, "setting": setting, "allocator": alloc, "checkpointing": ckpt,
                          "loss_chunk": chunk, "anon_peak_above_loaded_bytes": m.anon_peak_above("loaded"),
                          "rss_peak_above_loaded_bytes": m.peak_above("loaded"),
                          "loaded_anon_rss_bytes": m.loaded.anon_rss, "loaded_rss_bytes": m.loaded.rss,
                          "wall_s": time.perf_counter() - t0}
            print(f"{name}: peak above the loaded model {rows[name]['anon_peak_above_loaded_bytes'] / 2**20:,.0f} "
                  f"MiB anonymous, {rows[name]['rss_peak_above_loaded_bytes'] / 2**20:,.0f} MiB RSS", flush=True)

    def ratio(a_: str, b_: str, alloc: str) -> float:
        return (rows[f"{a_}, {alloc}"]["anon_peak_above_loaded_bytes"]
                / rows[f"{b_}, {alloc}"]["anon_peak_above_loaded_bytes"])

    ratios = {}
    for alloc in ("glibc default", f"mmap threshold {a.mmap_threshold}"):
        ratios[f"loraprune / llm-pruner, both as published ({alloc})"] = ratio(
            "loraprune, as published", "llm-pruner, as published", alloc)
        ratios[f"loraprune / llm-pruner, both lean ({alloc})"] = ratio("loraprune, lean", "llm-pruner, lean", alloc)
        ratios[f"loraprune lean / llm-pruner as published ({alloc})"] = ratio(
            "loraprune, lean", "llm-pruner, as published", alloc)
    write_json(OUT, {"model": a.model, "calib": {"dataset": "c4", "windows": a.windows, "seqlen": a.seqlen,
                                                 "batch": a.batch}, "rows": rows, "ratios_anon": ratios,
                     "loss_chunk": a.loss_chunk, "mmap_threshold": a.mmap_threshold,
                     "machine": machine(), "date": today(),
                     "command": "python bench/bench_importance_memory.py " + " ".join(
                         f"--{k} {v}" for k, v in (("windows", a.windows), ("seqlen", a.seqlen), ("batch", a.batch),
                                                   ("loss-chunk", a.loss_chunk),
                                                   ("mmap-threshold", a.mmap_threshold)))})
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
