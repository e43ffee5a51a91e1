"""Zero-shot accuracy of a model on the local lm-eval tasks (the first --limit examples of each).

    SHEARKIT_DATA=../shared/data python bench/bench_zeroshot.py --limit 200 --batch-size 8

One task at a time (each record merges into bench/results/zeroshot.json as soon as it is measured,
so an interrupted run keeps its finished tasks); `python bench/tables.py` renders the file into
docs/benchmarks.md. See docs/zeroshot.md for the tasks and how the local files differ from the hub's.
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
from shearkit.io.atomic import write_json

TASKS = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    ap.add_argument("--out", default="bench/results/zeroshot.json")
    a = ap.parse_args()
    out = Path(a.out)
    model, tok = shearkit.load(a.model, device="cpu", dtype="float32")
    for task in a.tasks.split(","):
        t = time.perf_counter()
        rec = shearkit.evaluate(model, tok, [task], limit=a.limit, batch_size=a.batch_size, data_dir=a.data_dir)
        (name, r), = rec.items()
        result = json.loads(out.read_text()) if out.exists() else {"model": a.model, "tasks": {}}
        result["tasks"][name] = {**r, "wall_s": time.perf_counter() - t, "date": time.strftime("%Y-%m-%d"),
                                 "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                            f"{torch.get_num_threads()} threads"}
        write_json(out, result)
        print(name, json.dumps(r["metrics"]), flush=True)


if __name__ == "__main__":
    main()
