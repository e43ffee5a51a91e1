"""Peak memory against model size: a Wanda prune whole-model vs block by block (`--lazy`), and LLM-Pruner's
gradient scoring as published vs lean, on random Llama models of growing depth and width.

    python bench/bench_memory_scale.py                      # every size and mode not yet measured
    python bench/bench_memory_scale.py --sizes 0.1B,0.25B   # a subset
    python bench/tables.py                                   # the table in docs/benchmarks.md

Each model is built once with random weights (seed 0) and saved as float32 safetensors under
bench/out/memory-scale/ (git-ignored). Each measurement runs in a fresh child process
(`shearkit.eval.memory.measure_in_child`) whose setup only imports the libraries; the figure is the
peak anonymous RSS above that point (memory the process allocated: file-backed pages of the
memory-mapped safetensors do not count), sampled every 2 ms. Modes:

- `wanda whole`: `shearkit.load` (the whole model in memory), Wanda 50% on `--windows` x `--seqlen`
  random calibration tokens, save.
- `wanda lazy`: the same with `lazy=True` (blocks read from disk one at a time, pruned blocks written to
  a shard each, saved by streaming). Its output is checked to hold the same tensors as the whole run.
- `wanda max-memory`: `max_memory` = half the model's size: loaded lazily because the model does not fit.
- `llm-pruner as published` / `lean`: the whole model loaded, then one Taylor pass over the same tokens
  (`importance.passes.taylor_pass`; lean = activation checkpointing and the output head on 256 tokens
  at a time).

Rows merge into bench/results/memory_scale.json as they finish (a killed sweep goes on from there);
the plot is bench/results/memory_scale.png.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import time
from pathlib import Path

import torch

from cells import machine, today

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "memory_scale.json"
PLOT = ROOT / "bench" / "results" / "memory_scale.png"
WORK = ROOT / "bench" / "out" / "memory-scale"

# name -> (hidden, intermediate, layers, heads, kv heads); vocabulary 32000, embeddings tied. The first
# four grow in depth and width; the 0.25B model's width at 8 and 32 blocks shows depth alone.
SIZES = {
    "0.1B": (768, 2048, 12, 12, 4),
    "0.25B": (1024, 2816, 16, 16, 4),
    "0.5B": (1536, 4096, 18, 12, 4),
    "1B": (2048, 5632, 20, 16, 4),
    "0.25B at 8 blocks": (1024, 2816, 8, 16, 4),
    "0.25B at 32 blocks": (1024, 2816, 32, 16, 4),
}
MODES = ("wanda whole", "wanda lazy", "wanda max-memory", "llm-pruner as published", "llm-pruner lean")


def build(name: str) -> Path:
    """The random model of size `name`, saved once (float32 safetensors, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = WORK / name.replace(" ", "-")
    if (d / "config.json").exists():
        return d
    hidden, inter, layers, heads, kv = SIZES[name]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp, max_shard_size="1GB")
    tmp.rename(d)
    return d


def _imports():
    """What every mode imports before it is measured (library code is not the model's memory)."""
    import tokenizers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import shearkit.importance.passes  # noqa: F401
    import shearkit.io.lazy  # noqa: F401
    import shearkit.io.save  # noqa: F401
    import shearkit.methods.wanda  # noqa: F401


def wanda(_, src: str, out: str, calib: torch.Tensor, lazy: bool, max_memory: int | None) -> dict:
    """Load, Wanda 50%, save; returns whether the model was loaded lazily and the plan's sparsity."""
    from shearkit.io.lazy import is_lazy, load_lazy, needs_lazy
    from shearkit.io.save import save
    from shearkit.pruning import prune

    if lazy or needs_lazy(src, torch.float32, max_memory):
        model = load_lazy(src, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    plan = prune(model, None, "wanda", 0.5, calib=calib)
    save(model, None, out, plan=plan, overwrite=True)
    return {"lazy": is_lazy(model), "sparsity": plan.ratio_achieved}


def taylor(_, src: str, calib: torch.Tensor, lean: bool) -> dict:
    """Load the whole model and run one Taylor (first-order, weight-gradient) pass over `calib`."""
    from transformers import AutoModelForCausalLM

    from shearkit.importance.passes import taylor_pass

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    taylor_pass(model, calib, 4, lean, loss_chunk=256 if lean else 0)
    return {}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two saved models hold the same tensors under the same names."""
    from safetensors import safe_open

    def read(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys()})
        return out

    x, y = read(a), read(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def plot(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    depth = {"0.25B at 8 blocks", "0.25B", "0.25B at 32 blocks"}  # one width, 8 / 16 / 32 blocks
    for mode in MODES:
        pts = sorted((r["model_bytes"] / 2**30, r["anon_peak_bytes"] / 2**30) for r in rows.values()
                     if r["mode"] == mode and " at " not in r["size"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    for mode in ("wanda whole", "wanda lazy"):
        pts = sorted((r["model_bytes"] / 2**30, r["anon_peak_bytes"] / 2**30) for r in rows.values()
                     if r["mode"] == mode and r["size"] in depth)
        if len(pts) > 1:
            ax.plot(*zip(*pts), marker="x", ls="--", color="black", lw=0.8,
                    label=f"{mode}, width 1024 at 8 / 16 / 32 blocks")
    xs = sorted({r["model_bytes"] / 2**30 for r in rows.values()})
    if xs:
        ax.plot(xs, xs, ls=":", color="gray", label="model size S")
        ax.plot(xs, [0.5 * x for x in xs], ls="--", color="gray", label="0.5 x S")
    ax.set_xlabel("model size on disk, float32 (GiB)")
    ax.set_ylabel("peak anonymous RSS above the libraries (GiB)")
    ax.set_title("Peak memory against model size (random Llama models, one CPU process)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    from shearkit.eval.memory import measure_in_child
    from shearkit.io.atomic import write_json
    from shearkit.io.lazy import weight_bytes

    import json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--windows", type=int, default=8, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window")
    ap.add_argument("--redo", action="store_true")
    a = ap.parse_args()
    # the child processes unpickle this module's functions by name: they import it from bench/
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "bench"), os.environ.get("PYTHONPATH")) if p)
    import bench_memory_scale as me

    data = json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}
    rows = data["rows"]
    calib = torch.randint(0, 32000, (a.windows, a.seqlen), generator=torch.Generator().manual_seed(0))
    for size in a.sizes.split(","):
        src = build(size)
        whole_b, stem_b, block_b = weight_bytes(src, torch.float32)
        for mode in a.modes.split(","):
            key = f"{size} / {mode}"
            if key in rows and not a.redo:
                continue
            t0 = time.perf_counter()
            out = WORK / f"{size}-{mode}".replace(" ", "-")
            cap = whole_b // 2 if mode == "wanda max-memory" else None
            if mode.startswith("wanda"):
                work = functools.partial(me.wanda, src=str(src), out=str(out), calib=calib, lazy=mode == "wanda lazy",
                                         max_memory=cap)
            else:
                work = functools.partial(me.taylor, src=str(src), calib=calib, lean=mode.endswith("lean"))
            m = measure_in_child(work, setup=me._imports, imports=("torch",))
            row = {"size": size, "mode": mode, "config": dict(zip(("hidden", "intermediate", "layers", "heads",
                                                                   "kv_heads"), SIZES[size])),
                   "model_bytes": whole_b, "stem_bytes": stem_b, "block_bytes": block_b,
                   "anon_peak_bytes": m.anon_peak_above("loaded"), "rss_peak_bytes": m.peak_above("loaded"),
                   "max_memory_bytes": cap, **(m.result or {}), "wall_s": round(time.perf_counter() - t0, 1)}
            whole_out = WORK / f"{size}-wanda-whole".replace(" ", "-")
            if mode == "wanda lazy" and whole_out.exists():
                row["same_tensors_as_whole"] = same_tensors(out, whole_out)
            rows[key] = row
            print(f"{key}: peak {row['anon_peak_bytes'] / 2**20:,.0f} MiB anonymous for a {whole_b / 2**20:,.0f} MiB "
                  f"model ({row['wall_s']:.0f} s)", flush=True)
            data.update({"calib": {"windows": a.windows, "seqlen": a.seqlen, "tokens": "random, seed 0"},
                         "machine": machine(), "date": today(),
                         "command": f"python bench/bench_memory_scale.py --windows {a.windows} --seqlen {a.seqlen}"})
            write_json(OUT, data)
            plot(rows)
        for mode in MODES:  # the pruned copies are as large as the models: keep only the whole run's, for checks
            if mode != "wanda whole":
                shutil.rmtree(WORK / f"{size}-{mode}".replace(" ", "-"), ignore_errors=True)
    plot(rows)


if __name__ == "__main__":
    main()
