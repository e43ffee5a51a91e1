"""The benchmark grid: methods x ratios on the built-in model, one fixed protocol, resumable.

    SHEARKIT_DATA=../shared/data python bench/run.py                       # the whole grid
    SHEARKIT_DATA=../shared/data python bench/run.py --methods wanda --ratios 0.5
    SHEARKIT_DATA=../shared/data python bench/run.py --reeval-only         # re-evaluate kept models only
    python bench/run.py --render-only                                     # tables + plots from results

Protocol (fixed for every cell; recorded with each row): calibration 64 windows x 512 tokens from
`c4`, seed 0; WikiText-2 and PTB perplexity (`ppl_concat`, seqlen 512, first 40 windows; PTB rows
are the stripped lines, recorded as `ptb_text`); LoRA recovery only where a cell names a step count
(budget in tokens = steps x batch x seqlen, recorded).
Each cell runs `shearkit prune` in its own process (one torch thread unless --threads says
otherwise: on a shared machine more threads than free cores slow every window many times over) with
a time budget and keeps the pruned model
(bench/out/grid/<cell>/model, git-ignored). Cells whose recorded protocol is the current one are
skipped on the next run, so a grid completes over several sittings; a cell whose protocol differs
only in its evaluation is re-evaluated from its kept model without pruning again. Results are
merged into bench/results/grid.jsonl under a file lock. The tables between the grid markers in
docs/benchmarks.md and the plots in docs/img/ are regenerated from that file; a figure measured
under another protocol (such as PTB on the old raw-line text) is marked, never mixed in silently.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared bench helpers, also when imported by path
from cells import Results, machine, run_shearkit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "grid.jsonl"
THREADS = 1  # torch threads per cell process (--threads); recorded with each row
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
START, END = "<!-- grid:start -->", "<!-- grid:end -->"

PROTOCOL = {"model": "smollm2-135m", "calib": "c4", "calib_samples": 64, "calib_seqlen": 512, "seed": 0,
            "tasks": "wikitext2,ptb", "eval_seqlen": 512, "limit": 40, "ptb_text": "stripped lines"}
# protocol keys that only concern evaluation: a kept model is re-evaluated, not pruned again, when only these differ
EVAL_KEYS = {"tasks", "eval_seqlen", "limit", "ptb_text"}
OLD_PTB_TEXT = "raw lines"  # rows from before `ptb_text` was recorded were measured on the unstripped lines
# (method, ratio, nm, recover steps)
GRID = [("dense", 0.0, None, 0)]
GRID += [(m, r, None, 0) for m in ("magnitude", "wanda", "sparsegpt", "besa") for r in (0.5, 0.6)]
GRID += [(m, 0.5, "2:4", 0) for m in ("magnitude", "wanda", "sparsegpt")]
GRID += [(m, r, None, 0) for m in ("structured-magnitude", "llm-pruner") for r in (0.2, 0.5)]


def cell_key(method: str, ratio: float, nm: str | None, recover: int) -> str:
    return f"{method}-r{ratio:g}" + (f"-nm{nm.replace(':', 'of')}" if nm else "") + (f"-rec{recover}" if recover else "")


def load_results() -> dict[str, dict]:
    return Results(RESULTS).load()


def results_lock():
    """The lock that every read-merge-write of the results file holds (a sibling file, git-ignored)."""
    return Results(RESULTS).lock()


def save_row(row: dict) -> dict[str, dict]:
    """Merge one finished cell into the results file under the file lock (re-read inside it, so that
    two grid processes running different cells do not drop each other's rows) and return all rows;
    a failed attempt does not erase an earlier finished measurement (`cells.merge_attempt`)."""
    return Results(RESULTS).save(row)


def row_protocol(row: dict) -> dict:
    """The protocol a row was measured under; rows from before `ptb_text` was recorded used the raw lines."""
    return {"ptb_text": OLD_PTB_TEXT, **row.get("protocol", {})}


def protocol_diff(row: dict) -> set[str]:
    """The protocol keys on which a row differs from the current protocol."""
    have = row_protocol(row)
    return {k for k in PROTOCOL.keys() | have.keys() if have.get(k) != PROTOCOL.get(k)}


def is_current(row: dict | None) -> bool:
    """A finished row measured under the current protocol."""
    return bool(row) and row.get("status") == "ok" and not protocol_diff(row)


def kept_model(workdir: Path, key: str) -> Path:
    """Where a cell keeps its pruned model."""
    return workdir / key / "model"


def run_cell(method: str, ratio: float, nm: str | None, recover: int, budget_s: int, workdir: Path) -> dict:
    """Run one cell in a subprocess and return its result row (status ok | failed | timeout)."""
    key = cell_key(method, ratio, nm, recover)
    out = workdir / key
    p = PROTOCOL
    if method == "dense":
        cmd = ["eval", p["model"], "--tasks", p["tasks"], "--seqlen", str(p["eval_seqlen"]), "--limit", str(p["limit"])]
    else:
        cmd = ["prune", p["model"], "--method", method, "--ratio", str(ratio), "--calib", p["calib"],
               "--calib-samples", str(p["calib_samples"]), "--calib-seqlen", str(p["calib_seqlen"]),
               "--seed", str(p["seed"]), "--tasks", p["tasks"], "--eval-seqlen", str(p["eval_seqlen"]),
               "--limit", str(p["limit"]), "--no-dense-eval", "--save-format", "dense"]
        if nm:
            cmd += ["--nm", nm]
        if recover:
            cmd += ["--recover", str(recover)]
    cmd += ["--out", str(out), "--overwrite", "--device", "cpu"]
    t0 = time.perf_counter()
    row = {"key": key, "method": method, "ratio": ratio, "nm": nm, "recover_steps": recover, "protocol": PROTOCOL,
           "machine": machine(),
           "threads": THREADS,
           "date": time.strftime("%Y-%m-%d")}
    err = _shearkit(cmd, budget_s)
    row["wall_s"] = time.perf_counter() - t0
    if err is not None:
        return {**row, **err, "wall_s": budget_s if err["status"] == "timeout" else row["wall_s"]}
    return read_cell(out, row)


def reeval_cell(row: dict, budget_s: int, workdir: Path) -> dict:
    """Re-evaluate a finished cell's kept model under the current protocol, keeping its pruning figures."""
    key = row["key"]
    out = workdir / key / "eval"
    p = PROTOCOL
    cmd = ["eval", str(kept_model(workdir, key)), "--tasks", p["tasks"], "--seqlen", str(p["eval_seqlen"]),
           "--limit", str(p["limit"]), "--out", str(out), "--overwrite", "--device", "cpu"]
    t0 = time.perf_counter()
    err = _shearkit(cmd, budget_s)
    wall = time.perf_counter() - t0
    if err is not None:  # keep the earlier figures, say the re-evaluation did not finish
        return {**row, "reeval": {**err, "wall_s": wall, "date": time.strftime("%Y-%m-%d")}}
    new = read_eval(json.loads((out / "metrics.json").read_text()), dict(row))
    new.pop("reeval", None)
    new.update(eval_wall_s=wall, eval_date=time.strftime("%Y-%m-%d"), eval_threads=THREADS,
               protocol={**row_protocol(row), **{k: new["protocol"][k] for k in EVAL_KEYS}})
    return new


def _shearkit(cmd: list[str], budget_s: int) -> dict | None:
    """Run one shearkit command in a child process with THREADS torch threads; None when it succeeded."""
    return run_shearkit(cmd, budget_s, THREADS)


def read_eval(m: dict, row: dict) -> dict:
    """Fill a row's perplexities from a metrics.json, with the PTB text they were measured on."""
    tasks = m["tasks"]
    row.update(status="ok", wikitext2=tasks["wikitext2"]["value"], ptb=tasks["ptb"]["value"])
    row["protocol"] = {**PROTOCOL, "ptb_text": _ptb_text(tasks["ptb"])}
    return row


def _ptb_text(task: dict) -> str:
    """Which PTB text a task result was measured on, from the data record it carries."""
    return task.get("rows") or task.get("details", {}).get("rows") or OLD_PTB_TEXT


def read_cell(out: Path, row: dict) -> dict:
    """Complete a result row from a finished cell's run directory (its metrics.json)."""
    m = json.loads((out / "metrics.json").read_text())
    read_eval(m, row)
    if "prune" in m:
        row.update(ratio_achieved=m["prune"]["ratio_achieved"], prune_s=m["prune"]["wall_s"],
                   peak_memory_mib=m["prune"]["peak_memory_bytes"] / 2**20)
    if "recover" in m:
        row["recover_tokens"] = m["recover"].get("budget", {}).get("tokens")
    if "params" in m:
        row["params"] = m["params"]
    return row


def protocol_marks(row: dict, notes: dict[str, str]) -> tuple[str, str]:
    """Marks for a row measured under another protocol: one on its PTB figure when only the PTB text
    differs, one on the whole row otherwise; the footnotes they need are added to `notes`."""
    diff = protocol_diff(row)
    ptb_mark = row_mark = ""
    if "ptb_text" in diff:
        ptb_mark = " †"
        notes[ptb_mark.strip()] = (f"PTB measured on the old text ({row_protocol(row)['ptb_text']}, before each line "
                                   f"was stripped): not comparable with the unmarked PTB figures; the cell awaits a "
                                   f"re-run.")
    other = sorted(diff - {"ptb_text"})
    if other:
        row_mark = " ‡"
        notes[row_mark.strip()] = (f"measured under a different protocol (differs in {', '.join(other)}): "
                                   f"not comparable with the other rows.")
    return ptb_mark, row_mark


FAMILIES = {"unstructured": ("magnitude", "wanda", "sparsegpt", "besa"),
            "structured": ("structured-magnitude", "llm-pruner")}


def _family_points(results: dict[str, dict], methods: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """(ratio, WikiText-2) of each method's finished cells without N:M or recovery, for the plots."""
    ok = [r for r in results.values() if r.get("status") == "ok"]
    pts = {m: sorted((r["ratio"], r["wikitext2"]) for r in ok if r["method"] == m and not r["nm"]
                     and not r["recover_steps"]) for m in methods}
    return {m: p for m, p in pts.items() if p}


def grid_region(results: dict[str, dict]) -> str:
    """The grid's region of docs/benchmarks.md (START to END): the table, its notes, the plots' links."""
    notes: dict[str, str] = {}
    lines = [START, "", f"Protocol: {json.dumps(PROTOCOL)}. Regenerated by `python bench/run.py --render-only`.", "",
             "| method | ratio | N:M | recovery steps | achieved | WikiText-2 | PTB | prune s | peak MiB | cell s | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results.values(), key=lambda r: (r["method"] != "dense", r["method"], r["ratio"], r["nm"] or "")):
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['ratio']:g} | {r['nm'] or ''} | {r['recover_steps']} | {r['status']} "
                         f"| | | | | {r.get('wall_s', 0):.0f} | {r['date']} |")
            continue
        f = lambda k, fmt="{:.2f}": fmt.format(r[k]) if r.get(k) is not None else ""  # noqa: E731
        ptb_mark, row_mark = protocol_marks(r, notes)
        lines.append(f"| {r['method']}{row_mark} | {r['ratio']:g} | {r['nm'] or ''} | {r['recover_steps']} | "
                     f"{f('ratio_achieved', '{:.4f}')} | {f('wikitext2')} | {f('ptb')}{ptb_mark} | {f('prune_s', '{:.0f}')} | "
                     f"{f('peak_memory_mib', '{:.0f}')} | {r['wall_s']:.0f} | {r['date']} |")
    if notes:
        lines += [""] + [f"{mark} {text}" for mark, text in notes.items()]
    for fam, methods in FAMILIES.items():
        if _family_points(results, methods):
            lines += ["", f"![ppl vs ratio, {fam}](img/ppl_vs_ratio_{fam}.png)"]
    return "\n".join([*lines, "", END])


def plot_grid(results: dict[str, dict]) -> None:
    """WikiText-2 perplexity against ratio, one plot per family (docs/img/ppl_vs_ratio_<family>.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r for r in results.values() if r.get("status") == "ok" and r["method"] == "dense"), None)
    IMG.mkdir(parents=True, exist_ok=True)
    for fam, methods in FAMILIES.items():
        points = _family_points(results, methods)
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for m, pts in points.items():
            ax.plot(*zip(*pts), marker="o", label=m)
        if dense:
            ax.axhline(dense["wikitext2"], color="gray", ls="--", label="dense")
        ax.set_xlabel("ratio (structured: block params removed; unstructured: sparsity)")
        ax.set_ylabel("WikiText-2 ppl (512, 40 windows)")
        ax.set_yscale("log")
        ax.set_title(f"SmolLM2-135M, {fam}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(IMG / f"ppl_vs_ratio_{fam}.png", dpi=110)
        plt.close(fig)


def render(results: dict[str, dict]) -> None:
    """Rewrite the grid region of docs/benchmarks.md and the ppl-vs-ratio plots."""
    plot_grid(results)
    region = grid_region(results)
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n## The grid\n\n"
    if START in doc and END in doc:
        doc = doc[: doc.index(START)] + region + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + region + "\n"
    DOC.write_text(doc)


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", help="comma-separated subset of methods")
    ap.add_argument("--ratios", help="comma-separated subset of ratios")
    ap.add_argument("--budget", type=int, default=1800, help="seconds per cell before it is stopped")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per cell process (default 1)")
    ap.add_argument("--redo", action="store_true", help="prune and measure again even cells already current")
    ap.add_argument("--reeval-only", action="store_true",
                    help="only re-evaluate cells whose kept model is there; never prune")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "grid"))
    a = ap.parse_args()
    THREADS = a.threads
    results = load_results()
    if not a.render_only:
        methods = set(a.methods.split(",")) if a.methods else None
        ratios = {float(x) for x in a.ratios.split(",")} if a.ratios else None
        cells = [c for c in GRID if (methods is None or c[0] in methods) and (ratios is None or c[1] in ratios or c[0] == "dense")]
        workdir = Path(a.workdir)
        for i, (m, r, nm, rec) in enumerate(cells):
            key = cell_key(m, r, nm, rec)
            tag = f"[{i + 1}/{len(cells)}] {key}"
            action = plan_cell(load_results().get(key), kept_model(workdir, key), m == "dense", a.redo, a.reeval_only)
            if action in ("skip", "no-model"):
                print(f"{tag}: " + ("current already, skipped" if action == "skip" else
                                    "no kept model to re-evaluate, skipped (run without --reeval-only)"), flush=True)
                continue
            print(f"{tag}: {action} ...", flush=True)
            row = (reeval_cell(load_results()[key], a.budget, workdir) if action == "re-evaluate"
                   else run_cell(m, r, nm, rec, a.budget, workdir))
            results = save_row(row)
            print(f"    {row['status']}: " + ", ".join(f"{k}={row[k]:.3f}" for k in ("wikitext2", "ptb") if k in row)
                  + (f" (re-evaluation {row['reeval']['status']})" if "reeval" in row else ""), flush=True)
            render(results)
    render(load_results())


def plan_cell(row: dict | None, model: Path, dense: bool, redo: bool, reeval_only: bool) -> str:
    """What to do with one cell: skip | re-evaluate (kept model, only the evaluation changed) | prune | no-model."""
    if row is not None and is_current(row) and not redo:
        return "skip"
    if dense:
        return "evaluate"
    can_reeval = (row is not None and row.get("status") == "ok" and protocol_diff(row) <= EVAL_KEYS
                  and (model / "config.json").exists())
    if can_reeval and not redo:
        return "re-evaluate"
    return "no-model" if reeval_only else "prune"


if __name__ == "__main__":
    main()
