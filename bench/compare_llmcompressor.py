"""Compare shearkit's SparseGPT and Wanda with llm-compressor's on identical token windows.

Protocol (issue 5): SmolLM2-135M (built-in, float32, CPU); calibration 64 x 512 tokens from c4
(seed 0), drawn once by `shearkit.data.calibration_windows` and saved as safetensors so that both
implementations see the same tokens in the same order; sparsity 50% unstructured and 2:4 of the
decoder blocks' linear weights (lm_head / embeddings untouched); SparseGPT with dampening 0.01 and
block size 128. llm-compressor runs in its own venv through `bench/llmc_worker.py` (subprocess);
its pruned weights come back as plain safetensors and are loaded into shearkit's copy of the base
model, so both are evaluated by the same code: `shearkit.eval.perplexity.perplexity` on WikiText-2
and PTB, seqlen 512, first 40 windows. Wall time covers the pruning call only (their `oneshot`,
our `shearkit.prune`), not model loading, saving or evaluation; process CPU time is recorded too
because the machine is shared.

    SHEARKIT_DATA=<data dir> /work/venv/bin/python bench/compare_llmcompressor.py \
        [--methods sparsegpt,wanda] [--patterns unstructured,2:4] [--llmc-python /work/venv-llmc/bin/python]

Writes bench/results/compare_llmc.json (updated after every run) and docs/compare_llmcompressor.md.
`--render-only` rewrites the markdown from the JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "bench" / "llmc_worker.py"
EVAL_SETS = ("wikitext2", "ptb")
OLD_PTB_TEXT = "raw lines"  # results from before `ptb_text` was recorded: each PTB line's space and newline kept
OLD_PTB_NOTE = ("† PTB measured on the old PTB text (each line's leading space and trailing newline kept, before "
                "shearkit's PTB rows became the stripped lines of the standard `ptb_text_only` loader). Both "
                "implementations were evaluated on that same text, so the paired comparison stands, but these PTB "
                "figures are not comparable with those in docs/benchmarks.md. Not re-run.")


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def linear_masks(model):
    """name -> bool zero-mask of every decoder linear weight."""
    import torch

    return {n: (m.weight.detach() == 0) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}


def sparsity_of(masks) -> float:
    z = sum(int(m.sum()) for m in masks.values())
    t = sum(m.numel() for m in masks.values())
    return z / max(t, 1)


def evaluate(model, tok, limit: int, seqlen: int) -> dict:
    from shearkit.eval.perplexity import perplexity

    return {ds: round(perplexity(model, tok, ds, seqlen=seqlen, limit=limit)["ppl"], 4) for ds in EVAL_SETS}


def run_theirs(args, method, pattern, calib_path, base_sd, workdir) -> tuple[dict, dict]:
    import torch
    from safetensors.torch import load_file

    import shearkit

    out = Path(workdir) / f"llmc_{method}_{pattern.replace(':', '-')}"
    mask = "0:0" if pattern == "unstructured" else pattern
    cmd = [args.llmc_python, str(WORKER), "--model", str(args.model_dir), "--calib", str(calib_path),
           "--method", method, "--sparsity", "0.5", "--mask", mask, "--block-size", "128", "--damp", "0.01",
           "--out", str(out), "--threads", str(args.threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TQDM_DISABLE"] = "1"
    la = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"llm-compressor worker failed ({method}, {pattern}): rc {proc.returncode}")
    res = json.loads((out / "result.json").read_text())
    res["subprocess_total_s"] = round(time.perf_counter() - t0, 1)
    res["loadavg_before"] = la
    res["command"] = " ".join(cmd)

    model, tok = shearkit.load(args.model_dir, device="cpu", dtype="float32")
    sd = load_file(str(out / "pruned.safetensors"))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)
    masks = linear_masks(model)
    lin_keys = {f"{n}.weight" for n in masks}
    changed_other = [k for k in own if k not in lin_keys and not torch.equal(own[k], base_sd[k])]
    res["load_check"] = {"missing_keys": missing, "unexpected_keys": unexpected,
                         "non_decoder_linear_tensors_changed": changed_other}
    res["achieved_sparsity_checked"] = sparsity_of(masks)
    res["ppl"] = evaluate(model, tok, args.limit, args.seqlen)
    del model
    return res, masks


def run_ours(args, method, pattern, calib, attn: str | None = None) -> tuple[dict, dict]:
    """shearkit's method; with `attn` the calibration forwards use that attention kernel
    (evaluation always uses the model's default, as for llm-compressor's weights)."""
    import torch

    import shearkit

    model, tok = shearkit.load(args.model_dir, device="cpu", dtype="float32")
    default_attn = model.config._attn_implementation
    if attn:
        model.set_attn_implementation(attn)
    nm = None if pattern == "unstructured" else pattern
    la = loadavg()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    plan = shearkit.prune(model, tok, method, ratio=0.5, nm=nm, calib=calib)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    if attn:
        model.set_attn_implementation(default_attn)
    masks = linear_masks(model)
    res = {"impl": "shearkit", "calib_attn": attn or default_attn, "method": method, "pattern": pattern, "prune_wall_s": round(wall, 2),
           "prune_cpu_s": round(cpu, 2), "torch_threads": torch.get_num_threads(), "loadavg_before": la,
           "achieved_sparsity": plan.ratio_achieved, "achieved_sparsity_checked": sparsity_of(masks),
           "plan_config": plan.config}
    res["ppl"] = evaluate(model, tok, args.limit, args.seqlen)
    del model
    return res, masks


def mask_agreement(a: dict, b: dict) -> dict:
    same = tot = both = 0
    za = zb = 0
    for k in a:
        same += int((a[k] == b[k]).sum())
        both += int((a[k] & b[k]).sum())
        za += int(a[k].sum())
        zb += int(b[k].sum())
        tot += a[k].numel()
    return {"same_fraction": round(same / tot, 5), "pruned_overlap": round(both / max(min(za, zb), 1), 5)}


def versions_main() -> dict:
    return {p: version(p) for p in ("shearkit", "torch", "transformers")}


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def _proto_key(r: dict) -> tuple:
    p = r.get("protocol", {})
    return (p.get("n"), p.get("limit"), p.get("calib_sha256"))


def ptb_text() -> str:
    """Which PTB text shearkit evaluates on now (from the data record), recorded with new results."""
    from shearkit.data import load_rows

    return load_rows("ptb").record.get("rows", OLD_PTB_TEXT)


def _ptb_label(ptb_text: str | None) -> str:
    """The PTB column's label: marked when the figure was measured on the old text."""
    return "ptb †" if (ptb_text or OLD_PTB_TEXT) == OLD_PTB_TEXT else "ptb"


def render(data: dict) -> str:
    rows = data.get("rows", [])
    for r in rows:  # rows written before rows carried their protocol share the file's
        r.setdefault("protocol", data.get("protocol", {}))
    env = data.get("environment", {})
    L = ["# shearkit vs llm-compressor: SparseGPT and Wanda on identical token windows", ""]
    L += [f"Measured {data.get('date', '?')} (last run) on {env.get('machine', '?')}. "
          "Model SmolLM2-135M-Instruct (built-in `smollm2-135m`, float32, CPU). "
          "Calibration windows from c4 (seed 0) were drawn once by `shearkit.data.calibration_windows`, saved "
          "as safetensors and fed to both implementations in the same order, one window per forward. "
          "Sparsity 50% of every decoder linear weight (q/k/v/o/gate/up/down of the 30 blocks; embeddings, "
          "norms and the tied lm_head untouched), unstructured or 2:4. SparseGPT: dampening 0.01 of "
          "mean(diag H), block size 128. Perplexity (WikiText-2 and PTB test, seqlen 512, the first `limit` "
          "windows) is computed by the same shearkit code for both models: llm-compressor's pruned weights "
          "are loaded into shearkit's copy of the base model.", ""]
    if data.get("dense"):
        d = data["dense"]
        old = _ptb_label(d.get("ptb_text")) != "ptb"
        L += [f"Dense model: WikiText-2 {fmt(d['wikitext2'])}, PTB {fmt(d['ptb'])}{' †' if old else ''}.", ""]
    if any(_ptb_label(r["protocol"].get("ptb_text")) != "ptb" for r in rows) or (
            data.get("dense") and _ptb_label(data["dense"].get("ptb_text")) != "ptb"):
        L += [OLD_PTB_NOTE, ""]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(_proto_key(r), []).append(r)
    for key, grp in groups.items():
        p = grp[0].get("protocol", {})
        L += [f"## Calibration {p.get('calib', '?')}; evaluation {p.get('eval', '?')}", "",
              f"Calibration tokens sha256 (int64) `{str(p.get('calib_sha256', '?'))[:16]}…`.", ""]
        L += ["| method | pattern | eval set | ours ppl | llm-compressor ppl | rel. diff | within 2% |",
              "|---|---|---|---:|---:|---:|:--:|"]
        for r in grp:
            for ds in EVAL_SETS:
                o, t = r["ours"]["ppl"][ds], r["theirs"]["ppl"][ds]
                rel = (o - t) / t
                label = _ptb_label(r["protocol"].get("ptb_text")) if ds == "ptb" else ds
                L.append(f"| {r['method']} | {r['pattern']} | {label} | {fmt(o)} | {fmt(t)} | {rel * 100:+.2f}% | "
                         f"{'yes' if abs(rel) <= 0.02 else 'no'} |")
        L += ["", "Pruning time (the pruning call only; model loading, saving and evaluation excluded). "
              "Wall ratio below 1 means ours is faster. The machine was shared with other jobs, so CPU "
              "seconds of the process (both run with 1 torch thread) are the steadier comparison:", "",
              "| method | pattern | ours wall s | theirs wall s | wall ratio ours/theirs | ours CPU s | theirs CPU s | CPU ratio | load avg before (ours / theirs) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in grp:
            o, t = r["ours"], r["theirs"]
            L.append(f"| {r['method']} | {r['pattern']} | {fmt(o['prune_wall_s'], 1)} | {fmt(t['prune_wall_s'], 1)} | "
                     f"{o['prune_wall_s'] / t['prune_wall_s']:.2f} | {fmt(o['prune_cpu_s'], 1)} | {fmt(t['prune_cpu_s'], 1)} | "
                     f"{o['prune_cpu_s'] / t['prune_cpu_s']:.2f} | {o['loadavg_before'][0] if o['loadavg_before'] else '?'} / "
                     f"{t['loadavg_before'][0] if t['loadavg_before'] else '?'} |")
        L += ["", "Achieved sparsity of the decoder linear weights (zeros counted in the weights after loading, "
              "so weights that were already zero count too) and agreement of the two zero masks:", "",
              "| method | pattern | ours | theirs | same mask entries | overlap of pruned sets |",
              "|---|---|---:|---:|---:|---:|"]
        for r in grp:
            a = r.get("mask_agreement", {})
            L.append(f"| {r['method']} | {r['pattern']} | {r['ours']['achieved_sparsity_checked']:.6f} | "
                     f"{r['theirs']['achieved_sparsity_checked']:.6f} | {a.get('same_fraction', '—')} | "
                     f"{a.get('pruned_overlap', '—')} |")
        L.append("")
    chk = [r for r in rows if r.get("ours_eager_calib")]
    if chk:
        L += ["## Check: shearkit calibrating with eager attention (as llm-compressor does)", "",
              "shearkit rerun with `model.set_attn_implementation(\"eager\")` during the pruning call only "
              "(evaluation as above), compared with the same llm-compressor weights:", "",
              "| method | pattern | eval set | ours (sdpa calib) | ours (eager calib) | llm-compressor | rel. diff eager vs theirs | same mask entries eager vs theirs |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in chk:
            e = r["ours_eager_calib"]
            for ds in EVAL_SETS:
                t = r["theirs"]["ppl"][ds]
                label = _ptb_label(r["protocol"].get("ptb_text")) if ds == "ptb" else ds
                L.append(f"| {r['method']} | {r['pattern']} | {label} | {fmt(r['ours']['ppl'][ds])} | {fmt(e['ppl'][ds])} | "
                         f"{fmt(t)} | {(e['ppl'][ds] - t) / t * 100:+.2f}% | {e['mask_agreement_vs_theirs']['same_fraction']} |")
        L.append("")
    L += ["## Commands", "", "```sh", *data.get("commands", []), "```", "",
          "Per run, the llm-compressor worker (in its own venv) was called as:", "", "```sh"]
    L += [r["theirs"]["command"] for r in rows]
    L += ["```", "", "## Versions and machine", ""]
    vm, vt = env.get("versions_main", {}), (rows[0]["theirs"]["versions"] if rows else {})
    L += [f"- shearkit venv: shearkit {vm.get('shearkit')}, torch {vm.get('torch')}, transformers {vm.get('transformers')}",
          f"- llm-compressor venv: llmcompressor {vt.get('llmcompressor')}, torch {vt.get('torch')}, transformers "
          f"{vt.get('transformers')}, compressed-tensors {vt.get('compressed-tensors')}, datasets {vt.get('datasets')}",
          f"- machine: {env.get('machine')}; torch threads {env.get('torch_threads')}; Python {env.get('python')}",
          ""]
    L += ["## What differs between the two implementations", ""] + [f"- {n}" for n in DIFFERENCES] + [""]
    if data.get("notes"):
        L += ["## Notes on this measurement", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(L)

# Read from llm-compressor 0.14.0.1's source (modifiers/pruning/{sparsegpt,wanda}, pipelines/sequential)
# and shearkit's (sparsity/, calibration/).
DIFFERENCES = [
    "Pipeline: the same in substance. llm-compressor's `sequential` pipeline (what `oneshot` picks for "
    "these modifiers) cuts the model at each `LlamaDecoderLayer` with torch.fx, runs a calibration pass "
    "through the still-dense layer with hooks on its linears, prunes all of them, then a second pass "
    "through the pruned layer gives the next layer's inputs (`propagate_error=True`). shearkit's "
    "`walk_blocks` does the same per block (statistics on the dense block, prune all its linears, rerun "
    "the pruned block). Neither prunes the linears of one block sequentially inside the block.",
    "Attention kernel during calibration: llm-compressor forces eager attention; shearkit runs the "
    "model's default (sdpa). Same maths, different rounding, so activations differ in the last bits and "
    "near-tied scores can fall on either side.",
    "Statistics: llm-compressor keeps one Hessian (SparseGPT) or squared-norm vector (Wanda) per linear "
    "layer, so q/k/v and gate/up each accumulate identical copies; shearkit shares one per distinct "
    "input (3 instead of 7 per block). llm-compressor normalises by the number of sequences, shearkit by "
    "the number of tokens; the scale cancels (dampening is relative to mean(diag H), Wanda ranks within "
    "a row).",
    "SparseGPT unstructured mask: both choose the mask per block of 128 columns from w^2 / [H^-1]_jj^2. "
    "llm-compressor prunes every score <= the value at sorted position int(0.5 * numel), i.e. one weight "
    "more than half per column block (more on ties), so its sparsity is slightly above 50%; shearkit "
    "prunes exactly round(0.5 * rows * cols) per layer, spread over the blocks.",
    "N:M (2:4): both pick the 2 lowest scores in every group of 4 inputs, for SparseGPT at the group's "
    "first column with the OBS-updated weights, as in the paper's code. Wanda unstructured: both drop "
    "the int(0.5 * in) lowest |W|*||X|| per output row.",
    "Timing: their wall time is the whole `oneshot` call (building the dataloader from the tokenised "
    "Dataset, fx tracing, lifecycle hooks, per-layer logging, the pruning); ours is the whole "
    "`shearkit.prune` call (capturing the first block's inputs, the block walk). Model loading, saving and "
    "evaluation are outside both.",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="sparsegpt,wanda")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--llmc-python", default="/work/venv-llmc/bin/python")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare_llmc.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "compare_llmcompressor.md"))
    ap.add_argument("--workdir", default=None, help="where the calibration file and pruned weights go (default: a temp dir)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both implementations")
    ap.add_argument("--eager-check", action="store_true",
                    help="rerun only shearkit, calibrating with eager attention as llm-compressor does, against the "
                         "llm-compressor weights already in --workdir; stored in the existing rows")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    out, doc = Path(args.out), Path(args.doc)

    if args.render_only:
        doc.write_text(render(json.loads(out.read_text())))
        return 0

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    import shearkit
    from shearkit.data import calibration_windows
    from shearkit.models.builtin import builtin_path

    args.model_dir = str(builtin_path("smollm2-135m"))
    model, tok = shearkit.load(args.model_dir, device="cpu", dtype="float32")
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(tok, "c4", n=args.n, seqlen=args.seqlen, seed=0)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="shearkit_llmc_"))
    workdir.mkdir(parents=True, exist_ok=True)
    calib_path = workdir / "calib.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_path))

    prev = json.loads(out.read_text()) if out.exists() else {}
    data = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commands": prev.get("commands", []) + [" ".join(["SHEARKIT_DATA=$SHEARKIT_DATA", sys.executable, *sys.argv])],
        "protocol": {"calib": f"c4, {args.n} windows x {args.seqlen} tokens, seed 0",
                     "calib_sha256": hashlib.sha256(calib.to(torch.int64).numpy().tobytes()).hexdigest(),
                     "eval": f"WikiText-2 and PTB test, seqlen {args.seqlen}, first {args.limit} windows",
                     "n": args.n, "seqlen": args.seqlen, "limit": args.limit,
                     "sparsity": 0.5, "sparsegpt": {"damp": 0.01, "blocksize": 128},
                     "ptb_text": ptb_text()},
        "environment": {"machine": f"{os.cpu_count()} CPU cores (shared with other jobs), no GPU, {platform.machine()}",
                        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                        "versions_main": versions_main()},
        "dense": prev.get("dense"), "rows": prev.get("rows", []), "notes": prev.get("notes", []),
    }
    for r in data["rows"]:
        r.setdefault("protocol", prev.get("protocol", {}))
    if not args.no_dense:
        data["dense"] = {**evaluate(model, tok, args.limit, args.seqlen), "ptb_text": ptb_text()}
        print("dense", data["dense"], flush=True)
    del model

    if args.eager_check:
        from safetensors.torch import load_file

        for method in args.methods.split(","):
            for pattern in args.patterns.split(","):
                row = next(r for r in data["rows"] if (r["method"], r["pattern"], _proto_key(r))
                           == (method, pattern, _proto_key({"protocol": data["protocol"]})))
                sd = load_file(str(workdir / f"llmc_{method}_{pattern.replace(':', '-')}" / "pruned.safetensors"))
                tmask = {k[: -len(".weight")]: v == 0 for k, v in sd.items()
                         if ".layers." in k and k.endswith("_proj.weight")}
                print(f"== {method} {pattern}: shearkit, eager attention during calibration", flush=True)
                ours, omask = run_ours(args, method, pattern, calib, attn="eager")
                ours["mask_agreement_vs_theirs"] = mask_agreement(omask, tmask)
                row["ours_eager_calib"] = ours
                save_json(out, data)
                doc.write_text(render(data))
        return 0

    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            print(f"== {method} {pattern}: llm-compressor", flush=True)
            theirs, tmask = run_theirs(args, method, pattern, calib_path, base_sd, workdir)
            print(json.dumps({k: theirs[k] for k in ("prune_wall_s", "prune_cpu_s", "achieved_sparsity_checked", "ppl")}), flush=True)
            print(f"== {method} {pattern}: shearkit", flush=True)
            ours, omask = run_ours(args, method, pattern, calib)
            print(json.dumps({k: ours[k] for k in ("prune_wall_s", "prune_cpu_s", "achieved_sparsity_checked", "ppl")}), flush=True)
            row = {"method": method, "pattern": pattern, "protocol": data["protocol"], "ours": ours, "theirs": theirs,
                   "mask_agreement": mask_agreement(omask, tmask),
                   "rel_diff": {ds: (ours["ppl"][ds] - theirs["ppl"][ds]) / theirs["ppl"][ds] for ds in EVAL_SETS},
                   "wall_ratio": ours["prune_wall_s"] / theirs["prune_wall_s"]}
            data["rows"] = [r for r in data["rows"] if (r["method"], r["pattern"], _proto_key(r))
                            != (method, pattern, _proto_key(row))] + [row]
            save_json(out, data)
            doc.write_text(render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
