"""Dense baseline of the built-in model: perplexity (first windows and full splits), size, speed, memory.

    SHEARKIT_DATA=../shared/data python bench/bench_dense.py --part speed
    SHEARKIT_DATA=../shared/data python bench/bench_dense.py --part ppl --tasks wikitext2 --limits 8
    SHEARKIT_DATA=../shared/data python bench/bench_dense.py --part ppl --tasks wikitext2 --limits all

Results merge into bench/results/dense.json (a perplexity row is replaced by a new measurement of the
same task, seqlen and window count; each row is written as soon as it is measured, so an interrupted
run keeps its finished rows); `python bench/tables.py` renders them into docs/benchmarks.md.
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


def load_results(path: Path) -> dict:
    """The results file as a dict (empty when absent)."""
    return json.loads(path.read_text()) if path.exists() else {}


def save_ppl_row(path: Path, row: dict) -> None:
    """Merge one perplexity row into the results file, replacing a row of the same protocol."""
    result = load_results(path)
    same = lambda r: (r["task"], r["seqlen"], r["limit"]) == (row["task"], row["seqlen"], row["limit"])  # noqa: E731
    result["ppl"] = [r for r in result.get("ppl", []) if not same(r)] + [row]
    write_json(path, result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--part", choices=["ppl", "speed", "all"], default="all")
    ap.add_argument("--tasks", default="wikitext2,ptb")
    ap.add_argument("--seqlens", default="512,2048")
    ap.add_argument("--limits", default="8,all", help="window counts; `all` = the full test split")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    ap.add_argument("--out", default="bench/results/dense.json")
    a = ap.parse_args()
    out = Path(a.out)

    t = time.perf_counter()
    model, tok = shearkit.load(a.model, device="cpu", dtype="float32")
    load_s = time.perf_counter() - t
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    if a.part in ("speed", "all"):
        speed = shearkit.bench(model, labels=[a.model], batch=a.batch, length=a.length, repeats=a.repeats,
                               decode_tokens=32)[a.model]
        result = load_results(out)
        result.update(model=a.model, params=shearkit.get_adapter(model).param_counts(),
                      speed={**speed, "load_s": load_s, "machine": machine, "loadavg": os.getloadavg(),
                             "date": time.strftime("%Y-%m-%d")})
        write_json(out, result)
        print(json.dumps(result["speed"], default=str), flush=True)
    if a.part in ("ppl", "all"):
        limits = [None if x == "all" else int(x) for x in a.limits.split(",")]
        for limit in limits:  # the first windows of every set before the (slow) full splits
            for seqlen in (int(s) for s in a.seqlens.split(",")):
                for task in a.tasks.split(","):
                    t = time.perf_counter()
                    r = shearkit.evaluate(model, tok, [task], seqlen=seqlen, limit=limit, data_dir=a.data_dir)[task]
                    row = {"task": task, "seqlen": seqlen, "limit": limit, "windows": r["windows"], "ppl": r["ppl"],
                           "eval_s": time.perf_counter() - t, "machine": machine, "date": time.strftime("%Y-%m-%d")}
                    save_ppl_row(out, row)
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
