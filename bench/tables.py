"""Render every benchmark table of docs/benchmarks.md from the results files in bench/results.

    python bench/tables.py            # rewrite the marked regions of docs/benchmarks.md
    python bench/tables.py --check    # exit 1 (and name the tables) when the doc differs
    python bench/tables.py --plots    # also redraw bench/results/<method>_layer_sparsity_<tag>.png

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; everything between the
markers is generated, so a figure typed into a table is overwritten (and `--check`, run by
tests/test_bench_tables.py, fails). The grid table has its own markers and generator
(`bench/run.py --render-only`). Results files and the scripts that write them:

    dense.json                  bench/bench_dense.py
    llm_pruner_variants.json    bench/bench_llm_pruner_variants.py
    structured.json             bench/bench_structured.py
    sparsity.json               bench/bench_sparsity.py (the --memory record)
    grid.jsonl                  bench/run.py
    compare_llmc.json           bench/compare_llmcompressor.py
    zeroshot.json               bench/bench_zeroshot.py
    training.jsonl              bench/bench_training.py
    importance_memory.json      bench/bench_importance_memory.py
    train_memory.json           bench/bench_train_memory.py
    train_throughput.json       bench/bench_train_throughput.py
    speculative.json            bench/bench_speculative.py
    memory_scale.json           bench/bench_memory_scale.py
    processes.json              bench/bench_processes.py
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
REGION = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)
TASK_NAMES = {"wikitext2": "WikiText-2", "ptb": "PTB"}


def _load(name: str, results: Path):
    path = results / name
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def _ppl(x: float | None) -> str:
    """Perplexity with two decimals (from 1000 up, whole numbers)."""
    if x is None:
        return "—"
    return f"{x:,.0f}" if x >= 1000 else f"{x:.2f}"


def _measured(d: dict) -> str:
    """When, where and with which command a results file was written."""
    return f"measured {d['date']} ({d['machine']}) with `{d['command']}`."


def _rate(s: dict, digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} (median of {s['n']}; {s['min']:.{digits}f}-{s['max']:.{digits}f})"


def dense_ppl(results: Path) -> list[str]:
    """Dense perplexity rows: the first windows of each set, then the full splits."""
    d = _load("dense.json", results)
    rows = sorted(d.get("ppl", []), key=lambda r: (r["limit"] is None, r["task"], r["seqlen"]))
    out = ["| data | seqlen | windows | perplexity | date |", "|---|---|---|---|---|"]
    for r in rows:
        windows = f"first {r['limit']}" if r["limit"] is not None else f"all {r['windows']} (full split)"
        out.append(f"| {TASK_NAMES[r['task']]} test | {r['seqlen']} | {windows} | {r['ppl']:.3f} | {r['date']} |")
    return out


def dense_size(results: Path) -> list[str]:
    """Dense model size, speed and memory."""
    d = _load("dense.json", results)
    p, s = d["params"], d["speed"]
    st = s["setting"]
    cores = int(re.search(r"(\d+) cores", s["machine"]).group(1))
    busy = s["loadavg"][0] > cores  # other jobs held every core: timings say more about them than the model
    load_s = f"{s['load_s']:.1f} s"
    timed = lambda text: f"not given: load average {s['loadavg'][0]:.1f} on {cores} cores" if busy else text  # noqa: E731
    return [
        "| measure | value |", "|---|---|",
        f"| parameters | {p['unique']:,} unique ({p['total']:,} counting the tied lm_head twice); "
        f"{p['non_embedding']:,} non-embedding; {p['blocks']:,} in the decoder blocks |",
        f"| weights in memory | {_mib(s['weight_bytes'])} ({st['dtype'].replace('torch.', '')}) |",
        f"| prefill, batch {st['batch']} × {st['length']}, tokens/s | {timed(_rate(s['prefill_tokens_per_s']))} |",
        f"| decode, greedy with KV cache, batch {st['decode_batch']}, {st['decode_tokens']} tokens after "
        f"{st['decode_prompt']}, tokens/s | {timed(_rate(s['decode_tokens_per_s'], 1))} |",
        f"| peak process RSS during prefill | {_mib(s['peak_memory_bytes'])} |",
        f"| load from the cache | {timed(load_s)} |",
        f"| measured | {s['date']}, {s['machine']}; load average {s['loadavg'][0]:.1f} |",
    ]


def sparsity_summary(results: Path) -> list[str]:
    """The unstructured grid cells side by side: method x (50%, 60%, 2:4)."""
    rows = [r for r in _load("grid.jsonl", results) if r.get("status") == "ok" and not r.get("recover_steps")]
    cell = {(r["method"], r["ratio"], r["nm"]): r for r in rows}
    old_ptb = False

    def pair(r: dict) -> str:
        nonlocal old_ptb
        old = r.get("protocol", {}).get("ptb_text") != "stripped lines"  # rows from before the PTB text fix
        old_ptb |= old
        return f"{_ppl(r['wikitext2'])} / {_ppl(r['ptb'])}{'*' if old else ''}"

    out = ["| method | 50% WikiText-2 / PTB | 60% WikiText-2 / PTB | 2:4 WikiText-2 / PTB | prune s at 50% |",
           "|---|---|---|---|---|"]
    if ("dense", 0.0, None) in cell:
        out.append(f"| dense | {pair(cell['dense', 0.0, None])} | | | |")
    for m in ("magnitude", "wanda", "sparsegpt", "besa"):
        cols = [pair(cell[k]) if k in cell else "not in the grid" for k in ((m, 0.5, None), (m, 0.6, None), (m, 0.5, "2:4"))]
        half = cell.get((m, 0.5, None))
        prune_s = f"{half['prune_s']:.0f}" if half else ""
        out.append(f"| {m} | {' | '.join(cols)} | {prune_s} |")
    if old_ptb:
        out += ["", "\\* PTB on the old text (raw lines with their leading space and newline), not the standard "
                "stripped text; re-measured by the grid (`python bench/run.py`)."]
    return out


def sparsity_memory(results: Path) -> list[str]:
    """Compute-device memory of the blockwise path (the --memory record of bench_sparsity.py)."""
    m = _load("sparsity.json", results)["memory"][-1]
    how = "measured (max allocated)" if m["measured"] else "counted (no GPU: bytes that would sit on the device)"
    return ["| quantity | MiB |", "|---|---|",
            f"| parameters of the whole model | {m['params_mb']} |",
            f"| largest decoder block | {m['largest_block_mb']} |",
            f"| calibration activations (one copy) | {m['activations_mb']} |",
            f"| device memory, blockwise | {m['blockwise_device_mb']} |",
            f"| device memory, blockwise with `offload_activations` | {m['blockwise_offloaded_device_mb']} |",
            f"| device memory, whole model | {m['whole_model_device_mb']} |",
            f"| how | {how}, device {m['device']} |"]


def llm_pruner_variants(results: Path) -> list[str]:
    """LLM-Pruner variants at one ratio (one gradient pass), no recovery."""
    d = _load("llm_pruner_variants.json", results)
    out = ["| variant | ratio achieved | export | WikiText-2 |", "|---|---|---|---|",
           f"| dense | 0 | | {_ppl(d['dense_wikitext2'])} |"]
    for r in d["rows"]:
        out.append(f"| {r['label']} | {r['ratio_achieved']:.5f} | {r['export'] or ''} | {_ppl(r['wikitext2'])} |")
    p = d["protocol"]
    out += ["", f"Measured {d['date']} ({d['machine']}); ratio {p['ratio']}, calibration {p['calib_samples']} × "
            f"{p['calib_seqlen']} tokens from `{p['calib']}`, WikiText-2 seqlen {p['eval_seqlen']}, first "
            f"{p['limit']} windows, no recovery."]
    return out


def structured_quality(results: Path) -> list[str]:
    """Structured pruning: perplexity dense -> pruned -> recovered, and the cost."""
    rows = _load("structured.json", results)
    tasks = rows[0]["tasks"]
    head = " | ".join(f"{TASK_NAMES[t]} dense → pruned → recovered" for t in tasks)
    out = [f"| method | ratio | achieved | block params | {head} | prune s | prune peak MiB | recovery | recovery s | "
           "loss first → last step |", "|" + "---|" * (9 + len(tasks))]
    for r in rows:
        ppl = r["ppl"]
        q = " | ".join(" → ".join(_ppl(ppl[s][t]) for s in ("dense", "pruned", "recovered")) for t in tasks)
        b = r["recover_budget"] or {}
        out.append(f"| {r['method']} | {r['ratio']:g} | {r['ratio_achieved']:.5f} | "
                   f"{r['params_dense']['blocks'] / 1e6:.1f}M → {r['params_pruned']['blocks'] / 1e6:.1f}M | {q} | "
                   f"{r['prune_s']:.0f} | {r['prune_peak_mib']:,.0f} | {r['recover_steps']} steps, "
                   f"{b.get('tokens', 0):,} tokens ({b.get('label_tokens', 0):,} trained on) | {r['recover_s']:.0f} | "
                   f"{r['recover_loss_first']:.2f} → {r['recover_loss_last']:.2f} |")
    return out


def structured_speed(results: Path) -> list[str]:
    """Structured pruning: measured speed-ups against the FLOPs ideal."""
    rows = _load("structured.json", results)
    out = ["| method | ratio | ideal speed-up (FLOPs) | prefill speed-up | measured / ideal | prefill tokens/s dense, "
           "pruned (medians; ranges) | decode speed-up | weights | load average | date |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, p = r["prefill_tok_s_dense"], r["prefill_tok_s_pruned"]
        out.append(f"| {r['method']} | {r['ratio']:g} | {r['ideal_speedup']:.3f} | {r['prefill_speedup']:.3f} | "
                   f"{r['prefill_speedup'] / r['ideal_speedup']:.2f} | {d['median']:.0f}, {p['median']:.0f} "
                   f"({d['min']:.0f}-{d['max']:.0f}; {p['min']:.0f}-{p['max']:.0f}) | {r['decode_speedup']:.3f} | "
                   f"{r['weight_mib_dense']:.0f} → {r['weight_mib_pruned']:.0f} MiB | {r['loadavg'][0]:.1f} | {r['date']} |")
    s = rows[0]["setting"]
    out += ["", f"Speed setting: prefill batch {s['batch']} × {s['length']} tokens, greedy decode of "
            f"{s['decode_tokens']} tokens after a {s['decode_prompt']}-token prompt, median of {s['repeats']} after "
            f"{s['warmup']} warm-up, {s['dtype'].replace('torch.', '')}, {s['device']}, {s['threads']} threads; "
            f"{s.get('process', 'dense and pruned measured in turn')}, repeats interleaved. Speed-up = pruned tokens/s over dense."]
    return out


def llmc(results: Path) -> list[str]:
    """Ours against llm-compressor at the full protocol (64 calibration windows, 40 evaluation windows)."""
    d = _load("compare_llmc.json", results)
    rows = [r for r in d["rows"] if r.get("protocol", d["protocol"]).get("limit") == d["protocol"]["limit"]]
    out = ["| method | pattern | WikiText-2 ours / theirs | diff | PTB (old text) ours / theirs | diff | "
           "prune CPU s ours / theirs | ratio |", "|---|---|---|---:|---|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r["method"] != "wanda", r["pattern"] != "unstructured")):
        o, t = r["ours"], r["theirs"]
        cols = [f"{_ppl(o['ppl'][k])} / {_ppl(t['ppl'][k])} | {(o['ppl'][k] / t['ppl'][k] - 1) * 100:+.2f}%"
                for k in ("wikitext2", "ptb")]
        out.append(f"| {r['method']} | {r['pattern']} | {' | '.join(cols)} | {o['prune_cpu_s']:.0f} / "
                   f"{t['prune_cpu_s']:.0f} | {o['prune_cpu_s'] / t['prune_cpu_s']:.2f} |")
    return out


def zeroshot(results: Path) -> list[str]:
    """Zero-shot scores, one row per task, with the harness's standard errors."""
    d = _load("zeroshot.json", results)
    out = ["| task | examples | acc ± stderr | acc_norm ± stderr | main metric | harness | date |",
           "|---|---|---|---|---|---|---|"]
    for name, r in d["tasks"].items():
        m, e = r["metrics"], r.get("stderr", {})
        cell = lambda k: f"{m[k]:.3f} ± {e.get(k, float('nan')):.3f}" if k in m else "–"  # noqa: E731
        out.append(f"| `{name}` | {r['n_samples']} | {cell('acc')} | {cell('acc_norm')} | {r['metric']} = "
                   f"{r['value']:.3f} | {r['harness_version']} | {r['date']} |")
    return out


def training(results: Path) -> list[str]:
    """The training-benchmark protocol: methods that train, at one budget of training tokens."""
    rows = _suite(_load("training.jsonl", results), "width")
    order = {"dense": 0, "llm-pruner": 1, "loraprune": 2}
    rows = sorted((r for r in rows if r.get("status") == "ok"),
                  key=lambda r: (r["ratio"], not r.get("final"), order.get(r["method"], 9), r["key"]))
    out = ["| cell | method | options | ratio | achieved | WikiText-2 | PTB | KV groups / MLP channels removed "
           "(most channels in one layer) | tokens trained | prune + train s | prune-stage peak RSS MiB | date |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}: {v}" for k, v in r.get("options", {}).items()) or "—"
        secs = f"{(r.get('prune_s') or 0) + (r.get('recover_s') or 0):.0f}" if r["method"] != "dense" else "—"
        ach = f"{r['ratio_achieved']:.4f}" if "ratio_achieved" in r else "—"
        tok = f"{r['train_tokens']:,}" if r.get("train_tokens") else "—"
        peak = f"{r['prune_peak_mib']:,.0f}" if "prune_peak_mib" in r else "—"
        cut = (f"{r['kv_groups_removed']} / {r['mlp_channels_removed']:,} ({r['max_mlp_channels_removed']:,})"
               if "kv_groups_removed" in r else "—")
        out.append(f"| `{r['key']}` | {r['method']} | {opts} | {r['ratio']:g} | {ach} | {_ppl(r['wikitext2'])} | "
                   f"{_ppl(r['ptb'])} | {cut} | {tok} | {secs} | {peak} | {r['date']} |")
    p = rows[0]["protocol"] if rows else {}
    if p:
        t = p["train"]
        out += ["", f"Protocol: {p['model']}, budget {p['budget_tokens']:,} training tokens = {t['steps']} steps × "
                f"{t['batch_size']} × {t['seqlen']} (instruction examples are padded per batch, so fewer tokens are "
                f"seen: the column), `{t['data']}`, lr {t['lr']:g}, seed {t['seed']}, LoRA r {p['lora']['rank']} / "
                f"alpha {p['lora']['alpha']} / dropout {p['lora']['dropout']}; perplexity seqlen "
                f"{p['eval']['seqlen']}, first {p['eval']['limit']} windows. Times on a shared 2-core CPU "
                "with other jobs running: compare within a row, not across dates."]
    return out


def _suite(rows: list[dict], suite: str) -> list[dict]:
    """The rows of one suite of bench_training.py (rows from before suites existed are `width`)."""
    return [r for r in rows if r.get("suite", "width") == suite]


def blocks_training(results: Path) -> list[str]:
    """FlexiGPT's comparison: block removal, weight-shared replacement and width pruning at one budget."""
    rows = sorted((r for r in _suite(_load("training.jsonl", results), "blocks") if r.get("status") == "ok"),
                  key=lambda r: (r["blocks"], not r.get("final"), r["key"]))
    if not rows:
        return ["Not measured yet: `python bench/bench_training.py --suite blocks` fills these rows."]
    out = ["| cell | method | options | blocks | stored block params saved | WikiText-2 | PTB | tokens trained | "
           "unique params | disk MiB | prefill tok/s (× dense) | decode tok/s (× dense) | date |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        opts = ", ".join(f"{k}: {v}" for k, v in r.get("options", {}).items()) or "—"
        ach = f"{r['ratio_achieved']:.4f}" if "ratio_achieved" in r else "—"
        tok = f"{r['train_tokens']:,}" if r.get("train_tokens") else "—"
        sp = r.get("speed")
        if sp:
            size = f"{sp['params']['unique'] / 1e6:.1f} M | {sp['disk_bytes'] / 2**20:,.0f}"
            speed = (f"{sp['prefill_tok_s']:.0f} ({sp['prefill_tok_s'] / sp['prefill_tok_s_dense']:.2f}) | "
                     f"{sp['decode_tok_s']:.1f} ({sp['decode_tok_s'] / sp['decode_tok_s_dense']:.2f})")
        else:
            size, speed = "— | —", "— | —"
        out.append(f"| `{r['key']}` | {r['method']} | {opts} | {r['blocks']} | {ach} | {_ppl(r['wikitext2'])} | "
                   f"{_ppl(r['ptb'])} | {tok} | {size} | {speed} | {r['date']} |")
    t = rows[0]["protocol"]["train"]
    out += ["", f"Budget {rows[0]['protocol']['budget_tokens']:,} training tokens = {t['steps']} steps × "
            f"{t['batch_size']} × {t['seqlen']} of `{t['data']}`, seed {t['seed']}; LoRA lr {t['lr']:g}, FlexiGPT "
            "lr 1e-3 (adapters and norm scales only); perplexity seqlen 512, first 40 windows. Speed: batch 1, "
            "one child process per model, repeats interleaved, medians."]
    return out


def extend_training(results: Path) -> list[str]:
    """FlexiGPT's extension against the original at the same budget."""
    rows = [r for r in _suite(_load("training.jsonl", results), "extend") if r.get("status") == "ok"]
    if not rows:
        return ["Not measured yet: `python bench/bench_training.py --suite extend` fills these rows."]
    out = ["| cell | what | blocks | WikiText-2 | PTB | tokens trained | last training loss | unique params | date |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        what = ("the original, LoRA on every projection" if r["method"] == "lora" else
                f"{r['blocks_added']} shared copies ({', '.join(f'{k}: {v}' for k, v in r['options'].items())})")
        blocks = r.get("blocks_after", 30)
        unique = f"{r['params']['unique'] / 1e6:.1f} M" if r.get("params") else "—"
        loss = f"{r['train_loss_last']:.4f}" if r.get("train_loss_last") is not None else "—"
        out.append(f"| `{r['key']}` | {what} | {blocks} | {_ppl(r['wikitext2'])} | {_ppl(r['ptb'])} | "
                   f"{r.get('train_tokens') or 0:,} | {loss} | {unique} | {r['date']} |")
    t = rows[0]["protocol"]["train"]
    out += ["", f"Budget {rows[0]['protocol']['budget_tokens']:,} training tokens = {t['steps']} steps × "
            f"{t['batch_size']} × {t['seqlen']} of `{t['data']}`, seed {t['seed']}; LoRA lr {t['lr']:g}, the "
            "copies' adapters and norm scales lr 1e-3; perplexity seqlen 512, first 40 windows."]
    return out


def training_zeroshot(results: Path) -> list[str]:
    """Zero-shot scores of the training benchmark's final rows, with standard errors."""
    rows = [r for r in _load("training.jsonl", results) if r.get("zeroshot")]
    if not rows:
        return ["Not measured yet: `python bench/bench_training.py --zeroshot` fills these rows."]
    tasks = list(rows[0]["zeroshot"])
    out = ["| cell | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    for r in rows:
        z = r["zeroshot"]
        cells = [f"{z[t]['value']:.3f} ± {z[t]['stderr']:.3f}" if z[t].get("stderr") is not None
                 else f"{z[t]['value']:.3f}" for t in tasks]
        mean = sum(z[t]["value"] for t in tasks) / len(tasks)
        out.append(f"| `{r['key']}` | " + " | ".join(cells) + f" | {mean:.3f} |")
    zp = rows[0]["zeroshot_protocol"]
    out += ["", f"First {zp['limit']} examples of each task; the metric is acc_norm where the task has it, else acc."]
    return out


def importance_memory(results: Path) -> list[str]:
    """Peak memory of importance estimation: LoRA gradients against weight gradients."""
    d = _load("importance_memory.json", results)
    out = ["| estimator | setting | malloc | peak anonymous RSS above the loaded model | peak RSS above it | wall s |",
           "|---|---|---|---:|---:|---:|"]
    for r in d["rows"].values():
        setting = ("activations and full logits kept" if r["setting"] == "as published" else
                   f"checkpointing, head on {r['loss_chunk']} tokens at a time")
        out.append(f"| {r['method']} | {r['setting']}: {setting} | {r['allocator']} | "
                   f"{_mib(r['anon_peak_above_loaded_bytes'])} | {_mib(r['rss_peak_above_loaded_bytes'])} | "
                   f"{r['wall_s']:.0f} |")
    c = d["calib"]
    out += ["", "| ratio (anonymous RSS) | value |", "|---|---:|"]
    out += [f"| {k} | {v:.2f} |" for k, v in d["ratios_anon"].items()]
    out += ["", f"{d['model']}, {c['windows']} calibration windows of {c['seqlen']} tokens from `{c['dataset']}` in "
            f"batches of {c['batch']}, each estimator in a fresh child process; measured {d['date']} ({d['machine']}) "
            f"with `{d['command']}`."]
    return out


def knowledge_distribution(results: Path) -> list[str]:
    """LoRAShear's knowledge distribution of its 0.2 cell: per layer, each node group's deviation in its
    trial, whether it was kept whole, and the units its target removes."""
    cell = "lorashear-r0.2"
    d = _load(f"knowledge_distribution_{cell}.json", results)
    row = next(r for r in _load("training.jsonl", results) if r["key"] == cell)
    nodes = {(n["layer"], n["kind"]): n for n in d["nodes"]}
    out = ["| layer | attention: perplexity increase (relative) | KV groups removed | "
           "MLP: perplexity increase (relative) | MLP channels removed |", "|---:|---:|---:|---:|---:|"]

    def cell_(n: dict) -> tuple[str, str]:
        kept = " (kept whole)" if n["unprunable"] else ""
        return f"{n['relative_deviation']:.3g}{kept}", f"{round(n['target_ratio'] * n['units']):,} of {n['units']:,}"

    for layer in sorted({k[0] for k in nodes}):
        a, m = cell_(nodes[layer, "attn"]), cell_(nodes[layer, "mlp"])
        out.append(f"| {layer} | {a[0]} | {a[1]} | {m[0]} | {m[1]} |")
    h = d["heldout"]
    out += ["", f"{d['model']}: each node group alone with a fraction {d['trial_ratio']:g} of its units zeroed by "
            f"{d['proxy']}, perplexity on {h['windows']} held-out `{h['dataset']}` windows of {h['seqlen']} tokens "
            f"(dense {d['dense_ppl']:.2f}), relative increase; the most sensitive {d['gamma']:g} of the node groups "
            f"kept whole, the rest given targets that reach {d['ratio']:g} of the block parameters "
            f"({d['ratio_reached']:.4f} reached); {len(d['nodes'])} trials in {d['trials_wall_s'] / 60:.0f} min; "
            f"from the `{cell}` cell of `bench/bench_training.py`, {row['date']} ({row['machine']}). "
            f"Plot: `bench/results/knowledge_distribution_{cell}.png`."]
    return out


def lorashear_units(results: Path) -> list[str]:
    """Which units each kept LoRAShear cell removed, against the 0.2 cell's: how many are the same."""
    def units(name: str) -> set[tuple]:
        return {(i, k, u) for i, e in _load(name, results)["layers"].items() for k, us in e.items() for u in us}

    def kv(us: set[tuple]) -> int:
        return sum(1 for x in us if x[1] == "kv_groups")

    ref_cell = "lorashear-r0.2"
    ref = units(f"units_removed_{ref_cell}.json")
    out = [f"| cell | KV groups removed | MLP channels removed | units also removed by `{ref_cell}` | "
           "of them KV groups |", "|---|---:|---:|---:|---:|"]
    for f in sorted(results.glob("units_removed_*.json")):
        u = units(f.name)
        same = u & ref
        out.append(f"| `{f.stem.removeprefix('units_removed_')}` | {kv(u)} | {len(u) - kv(u):,} | "
                   f"{len(same):,} of {len(u):,} | {kv(same)} of {kv(u)} |")
    out += ["", "From each cell's plan, kept by `bench/bench_training.py` in `bench/results/units_removed_<cell>.json`."]
    return out


def memory_scale(results: Path) -> list[str]:
    """Peak anonymous RSS against model size: Wanda whole vs block by block, LLM-Pruner's scoring before vs after."""
    d = _load("memory_scale.json", results)
    rows = d["rows"]
    sizes = sorted({r["size"] for r in rows.values()}, key=lambda s: next(r["model_bytes"] for r in rows.values()
                                                                           if r["size"] == s))
    modes = ("wanda whole", "wanda lazy", "wanda max-memory", "llm-pruner as published", "llm-pruner lean")
    out = ["| model | layers × hidden | size S (float32) | one block | Wanda, whole model | Wanda, block by block "
           "(--lazy) | lazy / S | Wanda, --max-memory S/2 | LLM-Pruner scoring, as published | LLM-Pruner scoring, "
           "lean |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        by = {r["mode"]: r for r in rows.values() if r["size"] == s}
        any_ = next(iter(by.values()))
        c = any_["config"]
        cell = {m: _mib(by[m]["anon_peak_bytes"]) if m in by else "—" for m in modes}
        if "wanda lazy" in by and by["wanda lazy"].get("same_tensors_as_whole") is not None:
            cell["wanda lazy"] += "" if by["wanda lazy"]["same_tensors_as_whole"] else " (tensors differ!)"
        if "wanda max-memory" in by:
            mm = by["wanda max-memory"]
            cell["wanda max-memory"] += f" ({'lazy' if mm.get('lazy') else 'whole'})"
        ratio = f"{by['wanda lazy']['anon_peak_bytes'] / any_['model_bytes']:.3f}" if "wanda lazy" in by else "—"
        out.append(f"| {s} | {c['layers']} × {c['hidden']} | {_mib(any_['model_bytes'])} | {_mib(any_['block_bytes'])} | "
                   + " | ".join([cell["wanda whole"], cell["wanda lazy"], ratio, cell["wanda max-memory"],
                                 cell["llm-pruner as published"], cell["llm-pruner lean"]]) + " |")
    same = [r["same_tensors_as_whole"] for r in rows.values() if r.get("same_tensors_as_whole") is not None]
    c = d["calib"]
    out += ["", f"The lazy runs' saved models hold the same tensors as the whole-model runs' at {sum(same)} of "
            f"{len(same)} sizes (compared by the script). "
            f"Peak anonymous RSS above the interpreter with its libraries imported, each run in a fresh child "
            f"process; random Llama models (vocabulary 32,000, tied embeddings), {c['windows']} calibration windows of "
            f"{c['seqlen']} random tokens; Wanda runs load, prune 50% and save; {_measured(d)} "
            "Plot: `bench/results/memory_scale.png`."]
    return out


def processes(results: Path) -> list[str]:
    """LoRA training on one process against two at the same global batch: time and losses."""
    d = _load("processes.json", results)
    out = ["| setting | sequences per process | training s | tokens/s | losses |", "|---|---:|---:|---:|---|"]
    for name, r in d["rows"].items():
        out.append(f"| {name} | {r['per_process_batch']} | {r['train_s']:.1f} | {r['tokens_per_s']:.1f} | "
                   f"{', '.join(f'{x:.4f}' for x in r['losses'])} |")
    t = d["train"]
    out += ["", f"Two processes train {d['speed_up']:.2f} × as fast; the largest loss difference is "
            f"{d['max_loss_difference']:.1e}. {d['model']}, `recover` on `{t['data']}`, {t['steps']} steps of a global "
            f"batch of {t['global_batch']} × {t['seqlen']}, LoRA r {t['rank']}, dropout {t['dropout']:g}, lr {t['lr']:g}, "
            f"seed {t['seed']}, one torch thread per process; {_measured(d)}"]
    return out


def train_memory(results: Path) -> list[str]:
    """Peak memory and step time of LoRA training, as published against checkpointing and the chunked head."""
    d = _load("train_memory.json", results)
    w = d["weights_bytes"]
    out = ["| setting | malloc | peak RSS | peak RSS − 2 × weights | peak anonymous RSS (above the loaded model) | "
           "s / step | × as published | losses |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    base = {r["allocator"]: r["s_per_step"] for r in d["rows"].values() if r["setting"] == "as published"}
    for r in d["rows"].values():
        out.append(f"| {r['setting']} | {r['allocator']} | {_mib(r['rss_peak_bytes'])} | "
                   f"{_mib(r['rss_peak_bytes'] - 2 * w)} | {_mib(r['anon_peak_bytes'])} "
                   f"({_mib(r['anon_peak_above_loaded_bytes'])}) | {r['s_per_step']:.1f} | "
                   f"{r['s_per_step'] / base[r['allocator']]:.2f} | {', '.join(f'{x:.4f}' for x in r['losses'])} |")
    t = d["train"]
    out += ["", f"{d['model']}: {_mib(w)} of float32 weights; LoRA {t['lora']}, {t['steps']} steps on `{t['data']}` at "
            f"batch {t['batch']} × {t['seqlen']}, seed {t['seed']}, {t['threads']} thread; each setting in a fresh "
            f"child process (s / step: mean of the steps after the first); measured {d['date']} ({d['machine']}) "
            f"with `{d['command']}`."]
    return out


def train_throughput(results: Path) -> list[str]:
    """LoRA training throughput and its ratio to the machine's measured matmul rate."""
    d = _load("train_throughput.json", results)
    out = ["| label | commit | threads | loss chunk | malloc mmap threshold | tokens/s | FLOPs per step | "
           "matmul GFLOP/s | limit tokens/s | ratio | load average |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for label, r in d["runs"].items():
        threads = r["machine"].rsplit(", ", 1)[-1].split()[0]
        out.append(f"| {label} | `{r['commit']}` | {threads} | {r.get('loss_chunk') or 'off'} | "
                   f"{r.get('malloc_mmap_threshold') or 'glibc default'} | {r['tokens_per_s']:.2f} | "
                   f"{r['flops_per_step']:.3g} | {r['matmul_gflops']:.1f} | {r['limit_tokens_per_s']:.1f} | "
                   f"{r['ratio']:.3f} | {', '.join(f'{x:.1f}' for x in r['load_average'])} |")
    return out


def speculative(results: Path) -> list[str]:
    """Self-speculative decoding against greedy decoding, every run: tokens/s, ratios, draft acceptance."""
    runs = _load("speculative.json", results)["runs"]
    out = ["| run | decoder | lookahead | tokens/s | vs generate | vs greedy loop | draft tokens accepted |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for i, d in enumerate(runs, 1):
        load = d.get("load_average")
        run = f"{i}: {d['date']}, load {'/'.join(f'{x:.1f}' for x in load) if load else 'not recorded'}"
        gen, loop = d["generate_tokens_per_s"], d["greedy_loop_tokens_per_s"]
        out.append(f"| {run} | transformers `generate` | — | {gen:.2f} | 1.000 | — | — |")
        out.append(f"| {run} | greedy loop (same forward calls) | — | {loop:.2f} | {loop / gen:.3f} | 1.000 | — |")
        for k, r in d["speculative"].items():
            out.append(f"| {run} | self-speculative | {k} | {r['tokens_per_s']:.2f} | {r['vs_generate']:.3f} | "
                       f"{r['vs_greedy_loop']:.3f} | {r['acceptance']:.1%} |")
    return out


def llama_cpp(results: Path) -> list[str]:
    """llama.cpp on our GGUF files: size, perplexity beside PyTorch's, tokens/s against dense and the ideal."""
    d = _load("llama_cpp.json", results)
    models, files = d["models"], d["files"]
    dense = {f["outtype"]: f for f in files if f["model"] == "dense"}
    out = ["| model | GGUF | file | ppl llama.cpp | ppl PyTorch f32 | prefill tok/s | × dense | ideal × | "
           "prefill / ideal | decode tok/s | × dense | PyTorch prefill, decode tok/s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in files:
        m, base = models[f["model"]], dense[f["outtype"]]
        ideal = models["dense"]["flops_per_token"] / m["flops_per_token"]
        pre, dec = f["prefill_tok_s"] / base["prefill_tok_s"], f["decode_tok_s"] / base["decode_tok_s"]
        kind = f"{f['architecture']}, {f['outtype']}" + (f" ({f['f16_fallback']} in f16)" if f["f16_fallback"] else "")
        out.append(f"| `{f['model']}` | {kind} | {_mib(f['bytes'])} | {_ppl(f['ppl_llama_cpp'])} | {_ppl(m['ppl_torch'])} | "
                   f"{f['prefill_tok_s']:.0f} | {pre:.2f} | {ideal:.2f} | {pre / ideal:.2f} | {f['decode_tok_s']:.1f} | "
                   f"{dec:.2f} | {m['prefill_tok_s_torch']:.0f}, {m['decode_tok_s_torch']:.1f} |")
    s = d["setting"]
    out += ["", f"{d['threads']} thread(s) for both engines, median of {d['repeats']} interleaved repeats; prefill "
            f"{s['prefill']} tokens in one batch, decode {s['decode_tokens']} tokens one at a time after "
            f"{s['decode_prompt']}; perplexity on the first {s['ppl_windows']} windows of {s['ppl_seqlen']} of "
            f"{s['dataset']} (test). llama-cpp-python {d['llama_cpp_python']}; measured {d['date']} ({d['machine']}) "
            f"with `{d['command']}`. Ideal × = dense FLOPs per token over the model's; × dense at the same GGUF type."]
    return out


TABLES: dict[str, Callable[[Path], list[str]]] = {
    "dense-ppl": dense_ppl, "dense-size": dense_size, "sparsity-summary": sparsity_summary,
    "sparsity-memory": sparsity_memory, "llm-pruner-variants": llm_pruner_variants,
    "structured-quality": structured_quality, "structured-speed": structured_speed, "llmc": llmc,
    "zeroshot": zeroshot, "training": training, "training-zeroshot": training_zeroshot,
    "blocks-training": blocks_training, "extend-training": extend_training,
    "importance-memory": importance_memory, "memory-scale": memory_scale, "knowledge-distribution": knowledge_distribution,
    "lorashear-units": lorashear_units,
    "processes": processes, "train-memory": train_memory, "train-throughput": train_throughput, "speculative": speculative,
    "llama-cpp": llama_cpp,
}


def render_doc(doc: str, results: Path = RESULTS) -> str:
    """The doc with every marked table region regenerated from `results` (unknown names are errors)."""
    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"docs/benchmarks.md names an unknown table '{name}' (known: {', '.join(TABLES)}).")
        try:
            lines = TABLES[name](results)
        except FileNotFoundError as e:  # a results file not measured (yet): say so instead of a table
            lines = [f"Not measured: `bench/results/{Path(e.filename).name}` is missing."]
        return m.group(1) + "\n".join(lines) + "\n" + m.group(4)

    return REGION.sub(fill, doc)


def redraw_plots(results: Path = RESULTS) -> list[Path]:
    """Redraw the per-layer sparsity plots from the saved plans (plan_<method>_<tag>.json)."""
    from shearkit.plan import Plan
    from shearkit.sparsity.plot import plot_layer_sparsity

    drawn = []
    for plan_file in sorted(results.glob("plan_*_*.json")):
        method, tag = plan_file.stem[len("plan_"):].rsplit("_", 1)
        drawn.append(results / f"{method}_layer_sparsity_{tag}.png")
        plot_layer_sparsity(Plan.load(plan_file), drawn[-1])
    return drawn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the doc is out of date")
    ap.add_argument("--doc", default=str(DOC))
    ap.add_argument("--plots", action="store_true", help="also redraw the per-layer sparsity plots from the plans")
    a = ap.parse_args()
    doc_path = Path(a.doc)
    doc = doc_path.read_text()
    new = render_doc(doc)
    if a.check:
        stale = [m.group("name") for m, n in zip(REGION.finditer(doc), REGION.finditer(new)) if m.group(0) != n.group(0)]
        if stale:
            sys.exit(f"{doc_path}: out of date with bench/results: {', '.join(stale)} (run python bench/tables.py)")
        return
    if new != doc:
        tmp = doc_path.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(doc_path)
    if a.plots:
        redraw_plots()


if __name__ == "__main__":
    main()
