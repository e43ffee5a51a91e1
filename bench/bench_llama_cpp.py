"""llama.cpp running shearkit's GGUF exports: file size, prefill and decode tokens/s and perplexity of the
dense and the pruned SmolLM2-135M at f32 and q8_0, against the FLOP-ratio ideal and beside PyTorch.

    SHEARKIT_DATA=../shared/data python bench/bench_llama_cpp.py
    SHEARKIT_DATA=../shared/data python bench/bench_llama_cpp.py --repeats 7 --threads 1
    python bench/tables.py

Models: the dense model; LLM-Pruner at 0.2 and 0.5 (its default calibration, 64 windows of 512 tokens of
c4, no recovery: speed does not depend on it), pruned once and kept under bench/out/llama_cpp/; and each
final row of bench_training.py whose trained model is still kept on this machine
(bench/out/training/<cell>/run/model) and that GGUF can express (FlexiGPT's shared blocks cannot).
Each is written with `shearkit.export_gguf` at f32 and q8_0 (the q8_0 file keeps rows that are not a
multiple of 32 in f16, counted in the results).

llama.cpp (llama-cpp-python): every file loaded at once with the same thread count, the repeats
interleaved over the files; prefill = 512 tokens of WikiText-2 in one batch from an empty cache, decode
= 32 tokens one at a time after a 64-token prompt; the median of the repeats. Perplexity: the first
8 windows of 512 tokens of WikiText-2's test split from llama.cpp's logits, beside shearkit's own on the
PyTorch model. PyTorch's tokens/s: `shearkit.bench` on the same model folders (f32, same threads, one child
process per model, prefill of 512 tokens, 32 decode tokens after a 64-token prompt). The ideal speed-up
is the dense model's forward FLOPs per token over the model's (`shearkit.eval.flops`, prefill of 512).
Writes bench/results/llama_cpp.json (one run; a new run replaces it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from cells import machine, run_shearkit, today

import shearkit as sk
from shearkit.errors import ShearkitError
from shearkit.eval import llama_cpp as lcpp
from shearkit.eval.flops import forward_flops_per_token
from shearkit.eval.perplexity import eval_windows
from shearkit.io.atomic import write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "llama_cpp"
RESULT = ROOT / "bench" / "results" / "llama_cpp.json"
TRAINING = ROOT / "bench" / "results" / "training.jsonl"
MODEL = "smollm2-135m"
PRUNED = {"llm-pruner-r0.2": 0.2, "llm-pruner-r0.5": 0.5}
OUTTYPES = ("f32", "q8_0")
PREFILL, PROMPT, DECODE, PPL_WINDOWS = 512, 64, 32, 8


def pruned_dir(name: str, ratio: float, budget_s: int) -> Path:
    """A kept LLM-Pruner model (pruned once by `shearkit prune` in a child process, reused after)."""
    run = OUT / name
    if not (run / "model" / "config.json").exists():
        err = run_shearkit(["prune", MODEL, "--method", "llm-pruner", "--ratio", str(ratio), "--tasks", "wikitext2",
                            "--limit", "1", "--no-dense-eval", "--out", str(run), "--overwrite", "--device", "cpu"],
                           budget_s, threads=2)
        if err is not None:
            raise SystemExit(f"pruning {name} failed: {err}")
    return run / "model"


def trained_dirs() -> dict[str, Path]:
    """Final rows of the training benchmark whose model is kept here."""
    if not TRAINING.exists():
        return {}
    rows = [json.loads(line) for line in TRAINING.read_text().splitlines() if line.strip()]
    found = {}
    for r in rows:
        d = ROOT / "bench" / "out" / "training" / r["key"] / "run" / "model"
        if r.get("final") and r.get("status") == "ok" and r["method"] != "dense" and (d / "config.json").exists():
            found[r["key"]] = d
    return found


def export_all(models: dict[str, Path]) -> dict[str, dict]:
    """Each model at each outtype as a GGUF file; models GGUF cannot express are left out, with the reason."""
    files: dict[str, dict] = {}
    for name, d in models.items():
        for ot in OUTTYPES:
            path = OUT / f"{name}.{ot}.gguf"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                try:
                    r = sk.export_gguf(d, path, outtype=ot, overwrite=True)
                except ShearkitError as e:
                    print(f"  {name}: not exported ({e})", flush=True)
                    break
            files[f"{name}:{ot}"] = {"model": name, "outtype": ot, "path": path, "architecture": r["architecture"],
                                     "bytes": path.stat().st_size, "f16_fallback": len(r["f16_fallback"])}
    return files


def measure_llama_cpp(files: dict[str, dict], ids: list[int], repeats: int, threads: int) -> None:
    """Prefill and decode seconds of every file, repeats interleaved over the files (medians stored)."""
    llms = {k: lcpp.open_gguf(f["path"], n_ctx=PREFILL, threads=threads) for k, f in files.items()}
    prefill: dict[str, list[float]] = {k: [] for k in files}
    decode: dict[str, list[float]] = {k: [] for k in files}
    try:
        for k, llm in llms.items():  # warm-up
            lcpp.time_prefill(llm, ids[:PREFILL])
            lcpp.time_decode(llm, ids[:PROMPT], ids[PROMPT:PROMPT + 4])
        for r in range(repeats):
            for k, llm in llms.items():
                prefill[k].append(PREFILL / lcpp.time_prefill(llm, ids[:PREFILL]))
                decode[k].append(DECODE / lcpp.time_decode(llm, ids[:PROMPT], ids[PROMPT:PROMPT + DECODE]))
            print(f"  llama.cpp repeat {r + 1}/{repeats}", flush=True)
    finally:
        for llm in llms.values():
            llm.close()
    for k, f in files.items():
        f.update(prefill_tok_s=statistics.median(prefill[k]), decode_tok_s=statistics.median(decode[k]),
                 prefill_all=prefill[k], decode_all=decode[k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads for llama.cpp and PyTorch alike")
    ap.add_argument("--budget", type=int, default=3600, help="seconds allowed to prune each LLM-Pruner model")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    from shearkit.models.builtin import builtin_path

    models = {"dense": builtin_path(MODEL)}
    models.update({n: pruned_dir(n, r, a.budget) for n, r in PRUNED.items()})
    models.update(trained_dirs())
    print(f"models: {', '.join(models)}", flush=True)
    files = export_all(models)
    tok = None
    per_model: dict[str, dict] = {}
    for name in {f["model"] for f in files.values()}:
        model, tok = sk.load(models[name], device="cpu", dtype="float32")
        ppl = sk.evaluate(model, tok, ["wikitext2"], seqlen=PREFILL, limit=PPL_WINDOWS)["wikitext2"]["ppl"]
        per_model[name] = {"dir": str(models[name].relative_to(ROOT)) if models[name].is_relative_to(ROOT) else MODEL,
                           "params": sum(p.numel() for p in model.parameters()),
                           "flops_per_token": forward_flops_per_token(model, PREFILL)["total"], "ppl_torch": ppl}
        del model
    windows, _, _ = eval_windows(tok, "wikitext2", PREFILL, limit=PPL_WINDOWS)
    for k, f in files.items():
        llm = lcpp.open_gguf(f["path"], n_ctx=PREFILL, threads=max(a.threads, 2), logits_all=True)
        f["ppl_llama_cpp"] = lcpp.perplexity(llm, windows)["ppl"]
        llm.close()
        print(f"  {k}: llama.cpp ppl {f['ppl_llama_cpp']:.3f} (PyTorch {per_model[f['model']]['ppl_torch']:.3f})",
              flush=True)
    ids = windows[0].tolist()
    measure_llama_cpp(files, ids, a.repeats, a.threads)
    names = [n for n in models if n in per_model]
    torch_speed = sk.bench(*[str(models[n]) for n in names], labels=names, device="cpu", dtype="float32",
                           repeats=a.repeats, length=PREFILL, decode_tokens=DECODE, decode_prompt=PROMPT)
    for n in names:
        per_model[n].update(prefill_tok_s_torch=torch_speed[n]["prefill_tokens_per_s"]["median"],
                            decode_tok_s_torch=torch_speed[n]["decode_tokens_per_s"]["median"])
    import llama_cpp

    write_json(RESULT, {
        "date": today(), "machine": machine(), "threads": a.threads, "repeats": a.repeats,
        "llama_cpp_python": llama_cpp.__version__,
        "setting": {"prefill": PREFILL, "decode_prompt": PROMPT, "decode_tokens": DECODE, "ppl_windows": PPL_WINDOWS,
                    "ppl_seqlen": PREFILL, "dataset": "wikitext2"},
        "command": "python bench/bench_llama_cpp.py " + f"--repeats {a.repeats} --threads {a.threads}",
        "models": per_model,
        "files": [{**{k: v for k, v in f.items() if k != "path"}, "file": Path(f["path"]).name} for f in files.values()],
    })
    print(f"wrote {RESULT}", flush=True)


if __name__ == "__main__":
    main()
