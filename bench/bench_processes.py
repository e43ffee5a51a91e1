"""LoRA training on one process against two (DDP over gloo on the CPU) at the same global batch.

    SHEARKIT_DATA=../shared/data python bench/bench_processes.py            # both settings
    python bench/tables.py                                                   # the table in docs/benchmarks.md

SmolLM2-135M, `shearkit.recover` on `c4`: --steps optimizer steps of a global batch of 4 sequences of
256 tokens (one process × 4, or two processes × 2 under `accelerate launch --config_file
configs/accelerate/ddp.yaml --num_processes 2`), LoRA r 8 / alpha 16 / dropout 0 (so that the two runs
see the same computation, not two draws of dropout masks), lr 2e-4, seed 0, one torch thread per
process. Each setting runs this file as its worker (`--worker`); the main process of each writes its
losses and training time, and this script merges them into bench/results/processes.json. Run it on an
otherwise idle machine: the two processes need a core each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "processes.json"
TRAIN = {"data": "c4", "seqlen": 256, "lr": 2.0e-4, "seed": 0, "dropout": 0.0, "rank": 8, "alpha": 16,
         "warmup": 0, "merge": False}


def worker(steps: int, batch: int, out: str) -> None:
    """One process's part: load the model, train, and (main process) write the record."""
    import torch

    import shearkit
    from shearkit.recovery import RecoverConfig, recover

    torch.set_num_threads(1)
    model, tok = shearkit.load("smollm2-135m", device="cpu", dtype="float32")
    cfg = RecoverConfig(steps=steps, batch_size=batch, **TRAIN)
    t0 = time.perf_counter()
    _, history = recover(model, tok, cfg)
    wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({"losses": history["losses"], "train_s": history["time_s"],
                                         "wall_s": wall, "tokens": history["budget"]["tokens"],
                                         "processes": int(os.environ.get("WORLD_SIZE", "1"))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--worker", nargs=3, metavar=("STEPS", "BATCH", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(int(a.worker[0]), int(a.worker[1]), a.worker[2])
        return
    from cells import machine, today

    from shearkit.io.atomic import write_json

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    rows = {}
    for name, procs, batch in (("1 process x 4 sequences", 1, 4), ("2 processes x 2 sequences", 2, 2)):
        out = ROOT / "bench" / "out" / f"processes-{procs}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        me = [str(Path(__file__).resolve()), "--worker", str(a.steps), str(batch), str(out)]
        cmd = ([sys.executable, *me] if procs == 1 else
               [str(accelerate), "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
                "--num_processes", "2", *me])
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        rec = json.loads(out.read_text())
        rows[name] = {**rec, "per_process_batch": batch, "launch_s": time.perf_counter() - t0,
                      "tokens_per_s": rec["tokens"] / rec["train_s"]}
        print(f"{name}: {rec['train_s']:.1f} s of training, losses {rec['losses']}", flush=True)
    one, two = rows.values()
    write_json(OUT, {"rows": rows, "max_loss_difference": max(abs(x - y) for x, y in zip(one["losses"],
                                                                                         two["losses"])),
                     "speed_up": one["train_s"] / two["train_s"], "train": {**TRAIN, "steps": a.steps,
                                                                            "global_batch": 4},
                     "model": "smollm2-135m", "machine": machine(), "date": today(),
                     "command": f"python bench/bench_processes.py --steps {a.steps}"})


if __name__ == "__main__":
    main()
