"""Peak memory and step time of LoRA training: as published against checkpointing and a chunked output head.

    SHEARKIT_DATA=../shared/data python bench/bench_train_memory.py [--steps 3 --batch 4 --seqlen 256]

Each setting runs in a fresh child process of its own (`shearkit.eval.memory.measure_in_child`): the
child loads SmolLM2-135M in float32 and its tokenizer, then `shearkit.recover` trains LoRA (r 8 on the
seven projections) for `--steps` optimizer steps on Alpaca at batch `--batch` x `--seqlen`, seed 0,
no evaluation, adapters left unmerged. Four settings: as published (every activation and the
labelled positions' vocabulary logits kept for the backward pass), activation checkpointing only, the
chunked output head only (`loss_chunk`: the head and loss on that many tokens at a time,
`shearkit.arch.lm_head`), and both. Each runs under glibc's default malloc and with
`MALLOC_MMAP_THRESHOLD_` (`--mmap-threshold` bytes; allocations that large are returned to the system
when freed). Recorded: peak anonymous RSS and RSS (in total and above the loaded model), seconds per
step after the first (one torch thread), and the losses, which must be the same in every setting.
Writes bench/results/train_memory.json; `python bench/tables.py` renders it.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder, so the child imports this module

import bench_train_memory as me  # noqa: E402  (by name: the child process runs these functions)
from bench_importance_memory import child_env  # noqa: E402
from cells import machine, today  # noqa: E402
from shearkit.eval.memory import measure_in_child  # noqa: E402
from shearkit.io.atomic import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "train_memory.json"
SETTINGS = {  # name -> (activation checkpointing, loss chunk or 0)
    "as published": (False, 0),
    "checkpointing": (True, 0),
    "chunked head": (False, None),
    "checkpointing + chunked head": (True, None),
}


def load_pair(model: str) -> tuple:
    """Setup of a child: the float32 model and its tokenizer."""
    import shearkit

    return shearkit.load(model, device="cpu", dtype="float32")


def train(pair: tuple, steps: int, batch: int, seqlen: int, checkpointing: bool, loss_chunk: int,
          data_dir: str | None) -> dict:
    """`steps` LoRA steps on Alpaca; losses and the wall time of each step."""
    import torch

    from shearkit.recovery import recover

    torch.set_num_threads(1)
    model, tok = pair
    stamps = [time.perf_counter()]
    cfg = {"steps": steps, "data": "alpaca", "seqlen": seqlen, "batch_size": batch, "warmup": 0,
           "gradient_checkpointing": checkpointing, "loss_chunk": loss_chunk, "merge": False, "seed": 0}
    _, hist = recover(model, tok, cfg, data_dir=data_dir, masks=None,
                      on_step=lambda step, rec: stamps.append(time.perf_counter()))
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"losses": hist["losses"], "step_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--loss-chunk", type=int, default=256, help="tokens per output-head chunk")
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20, help="MALLOC_MMAP_THRESHOLD_ of the second runs")
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    a = ap.parse_args()
    rows = {}
    for alloc in ("glibc default", f"mmap threshold {a.mmap_threshold}"):
        env = {} if alloc == "glibc default" else {"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)}
        for setting, (ckpt, chunk) in SETTINGS.items():
            chunk = a.loss_chunk if chunk is None else chunk
            with child_env({**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}):
                m = measure_in_child(me.train, a.steps, a.batch, a.seqlen, ckpt, chunk, a.data_dir,
                                     setup=functools.partial(me.load_pair, a.model),
                                     imports=("torch", "transformers", "peft", "shearkit.models"))
            r = m.result
            name = f"{setting}, {alloc}"
            rows[name] = {"setting": setting, "allocator": alloc, "checkpointing": ckpt, "loss_chunk": chunk,
                          "anon_peak_bytes": m.peak.anon_rss, "rss_peak_bytes": m.peak.rss,
                          "anon_peak_above_loaded_bytes": m.anon_peak_above("loaded"),
                          "rss_peak_above_loaded_bytes": m.peak_above("loaded"),
                          "loaded_anon_rss_bytes": m.loaded.anon_rss, "loaded_rss_bytes": m.loaded.rss,
                          "losses": r["losses"], "step_s": r["step_s"],
                          "s_per_step": sum(r["step_s"][1:]) / max(len(r["step_s"]) - 1, 1)}
            print(f"{name}: peak anonymous RSS {m.peak.anon_rss / 2**20:,.0f} MiB "
                  f"({rows[name]['anon_peak_above_loaded_bytes'] / 2**20:,.0f} above the loaded model), "
                  f"{rows[name]['s_per_step']:.2f} s/step, losses {[round(x, 4) for x in r['losses']]}", flush=True)
    weights = _weights_bytes(a.model)
    write_json(OUT, {"model": a.model, "weights_bytes": weights,
                     "train": {"data": "alpaca", "steps": a.steps, "batch": a.batch, "seqlen": a.seqlen,
                               "lora": "r 8 / alpha 16 on the seven projections", "threads": 1, "seed": 0},
                     "rows": rows, "loss_chunk": a.loss_chunk, "mmap_threshold": a.mmap_threshold,
                     "machine": machine(), "date": today(),
                     "command": "python bench/bench_train_memory.py " + " ".join(
                         f"--{k} {v}" for k, v in (("steps", a.steps), ("batch", a.batch), ("seqlen", a.seqlen),
                                                   ("loss-chunk", a.loss_chunk),
                                                   ("mmap-threshold", a.mmap_threshold)))})


def _weights_bytes(model: str) -> int:
    """Bytes of `model`'s float32 weights, each tensor counted once (tied embeddings once)."""
    import shearkit

    m, _ = shearkit.load(model, device="cpu", dtype="float32")
    return sum(p.numel() * 4 for p in {p.data_ptr(): p for p in m.parameters()}.values())


if __name__ == "__main__":
    main()
