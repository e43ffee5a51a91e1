"""The training-benchmark protocol: methods that train, compared at one budget of training tokens.

    SHEARKIT_DATA=../shared/data python bench/bench_training.py              # every cell not yet done
    SHEARKIT_DATA=../shared/data python bench/bench_training.py --cells loraprune-r0.2
    SHEARKIT_DATA=../shared/data python bench/bench_training.py --zeroshot   # final rows' zero-shot scores
    SHEARKIT_DATA=../shared/data python bench/bench_training.py --suite blocks         # block methods
    SHEARKIT_DATA=../shared/data python bench/bench_training.py --suite blocks --speed # their speed and size
    python bench/tables.py                                                    # tables in docs/benchmarks.md

Protocol (recorded with every row): SmolLM2-135M, B = 131,072 training tokens = 128 optimizer steps x
4 sequences x 256 tokens (all tokens a method trains on, pruning-time training included; instruction
examples are padded per batch, so the tokens actually seen are fewer and recorded), Alpaca, LoRA
r 8 / alpha 16 / dropout 0.05 on the seven projections, lr 2e-4 (cosine, 5% warm-up), seed 0.
LLM-Pruner takes its gradients on 16 calibration windows of 512 tokens of C4 (not training) and then
recovers with LoRA for the whole budget; LoRAPrune prunes while it trains on the same budget;
LoRAShear spends half the budget on LHSPG (on c4 + wiki) and half on its dynamic recovery (c4 + wiki,
then Alpaca, re-weighted by measured degradation), its knowledge-distribution trials on held-out wiki
windows; its ablations at 20%: no knowledge distribution (gamma 0), a fixed mix, the decay variant.
Primary figure: perplexity on WikiText-2 and PTB (seqlen 512, first 40 windows); zero-shot (piqa,
hellaswag, arc_easy, winogrande, first 500 examples, with standard errors) only for the final rows.

Suite `blocks` (FlexiGPT's comparison): the same budget, batch and seed on pretraining text (`c4`,
as the paper trains on SlimPajama): ShortGPT (no training), ShortGPT + LoRA, FlexiGPT (adapters and
output-norm scales, lr 1e-3), and LLM-Pruner + LoRA at FlexiGPT's stored-parameter count (its ratio is
the FlexiGPT cell's achieved one, so that cell runs first), at 9 and 12 of 30 blocks (30% and 40%);
FlexiGPT's ablation at 9 blocks. `--speed` measures every kept model's size and prefill / decode
tokens/s against the dense model, each in its own child process, repeats interleaved.

Each cell is one `shearkit run` in its own process (one torch thread), keeps its run directory under
bench/out/training/<cell>/ (git-ignored), checkpoints its training every 16 steps, and merges its row
into bench/results/training.jsonl as soon as it finishes; a cell stopped part-way (a sitting ended, the
--budget ran out) continues from its checkpoints the next time it is run (`shearkit run --resume`), so
the benchmark completes over several sittings.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from cells import Results, machine, run_shearkit, today

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Results(ROOT / "bench" / "results" / "training.jsonl")
WORK = ROOT / "bench" / "out" / "training"

STEPS, BATCH, SEQLEN = 128, 4, 256
TRAIN = {"steps": STEPS, "data": "alpaca", "seqlen": SEQLEN, "batch_size": BATCH, "lr": 2.0e-4, "seed": 0}
EVAL = {"tasks": ["wikitext2", "ptb"], "seqlen": 512, "limit": 40}
ZEROSHOT = {"tasks": ["piqa", "hellaswag", "arc_easy", "winogrande"], "limit": 500}
PROTOCOL = {"model": "smollm2-135m", "budget_tokens": STEPS * BATCH * SEQLEN, "train": TRAIN, "eval": EVAL,
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.05}}

TRAIN_C4 = {**TRAIN, "data": "c4"}
BLOCK_PROTOCOL = {**PROTOCOL, "train": TRAIN_C4}
BLOCK_CALIB = {"dataset": "c4", "samples": 64, "seqlen": 512, "seed": 0}

# cell -> (method, ratio, prune options, final row?); block cells: ratio = blocks replaced / removed
CELLS: dict[str, tuple[str, float, dict, bool]] = {
    "dense": ("dense", 0.0, {}, True),
    "llm-pruner-r0.2": ("llm-pruner", 0.2, {}, True),
    "loraprune-r0.2": ("loraprune", 0.2, {}, True),
    "llm-pruner-r0.5": ("llm-pruner", 0.5, {}, True),
    "loraprune-r0.5": ("loraprune", 0.5, {}, True),
    "loraprune-r0.2-noema": ("loraprune", 0.2, {"ema": 0.0}, False),
    "loraprune-r0.2-uniform": ("loraprune", 0.2, {"allocation": "uniform"}, False),
    "lorashear-r0.2": ("lorashear", 0.2, {}, True),
    "lorashear-r0.5": ("lorashear", 0.5, {}, True),
    "lorashear-r0.2-gamma0": ("lorashear", 0.2, {"gamma": 0.0}, False),
    "lorashear-r0.2-fixed-mix": ("lorashear", 0.2, {"dynamic": {"adaptive": False}}, False),
    "lorashear-r0.2-decay": ("lorashear", 0.2, {"variant": "decay"}, False),
}
BLOCK_CELLS: dict[str, tuple[str, float, dict, bool]] = {
    "shortgpt-b9": ("shortgpt", 9, {}, False),
    "shortgpt-lora-b9": ("shortgpt+lora", 9, {}, True),
    "flexigpt-b9": ("flexigpt", 9, {}, True),
    "llm-pruner-at-flexigpt-b9": ("llm-pruner", 9, {}, True),
    "shortgpt-b12": ("shortgpt", 12, {}, False),
    "shortgpt-lora-b12": ("shortgpt+lora", 12, {}, True),
    "flexigpt-b12": ("flexigpt", 12, {}, True),
    "llm-pruner-at-flexigpt-b12": ("llm-pruner", 12, {}, True),
    "flexigpt-b9-plain-select": ("flexigpt", 9, {"select": "plain"}, False),
    "flexigpt-b9-no-norm": ("flexigpt", 9, {"output_norm": False}, False),
    "flexigpt-b9-lora-init": ("flexigpt", 9, {"init": "lora"}, False),
}
# FlexiGPT's extension (4.4) against the original at the same budget: the original fine-tuned with LoRA on
# c4, and the original grown by 6 weight-shared copies of its middle blocks 12..17 whose adapters and norm
# scales train on c4; ratio = blocks added
EXTEND_CELLS: dict[str, tuple[str, float, dict, bool]] = {
    "original-lora": ("lora", 0, {}, True),
    "extend-k6": ("extend", 6, {"pattern": "block", "start": 12, "end": 17}, True),
}
SUITES = {"width": CELLS, "blocks": BLOCK_CELLS, "extend": EXTEND_CELLS}


def suite_of(cell: str) -> str:
    return next((name for name, cells in SUITES.items() if cell in cells), "width")


def spec(cell: str) -> tuple[str, float, dict, bool]:
    return SUITES[suite_of(cell)][cell]


def protocol(cell: str) -> dict:
    return PROTOCOL if suite_of(cell) == "width" else BLOCK_PROTOCOL


def extend_recipe(cell: str) -> dict:
    """An extension-suite cell's recipe: LoRA on the original, or the extension trained, both on `c4`."""
    method, blocks, opts, _ = EXTEND_CELLS[cell]
    r: dict = {"model": {"name": PROTOCOL["model"], "device": "cpu", "dtype": "float32"}, "eval": EVAL,
               "eval_dense": False}
    if method == "lora":
        r["recover"] = dict(TRAIN_C4)
    else:  # the copies' adapters and norm scales, at FlexiGPT's learning rate
        r["extend"] = {"add_blocks": int(blocks), **opts, "train": {**TRAIN_C4, "lr": 1.0e-3, "save_every": SAVE_EVERY}}
    return r


SAVE_EVERY = 16  # training steps between a cell's checkpoints


def block_recipe(cell: str) -> dict:
    """A block-suite cell's recipe (FlexiGPT's comparison on pretraining text)."""
    method, blocks, opts, _ = BLOCK_CELLS[cell]
    r: dict = {"model": {"name": PROTOCOL["model"], "device": "cpu", "dtype": "float32"}, "eval": EVAL,
               "eval_dense": False, "calib": dict(BLOCK_CALIB)}
    if method.startswith("shortgpt"):
        r["prune"] = {"method": "shortgpt", "blocks": blocks, **opts}
        if method == "shortgpt+lora":
            r["recover"] = dict(TRAIN_C4)
    elif method == "flexigpt":
        r["prune"] = {"method": "flexigpt", "blocks": blocks, "train": {**TRAIN_C4, "lr": 1.0e-3}, **opts}
    else:  # llm-pruner at FlexiGPT's stored-parameter count
        flexi = RESULTS.load().get(f"flexigpt-b{blocks}")
        if not flexi or flexi.get("status") != "ok":
            raise SystemExit(f"{cell} takes its ratio from flexigpt-b{blocks}: run that cell first.")
        r["calib"] = {"dataset": "c4", "samples": 16, "seqlen": 512, "seed": 0}
        r["prune"] = {"method": "llm-pruner", "ratio": round(flexi["ratio_achieved"], 4), **opts}
        r["recover"] = dict(TRAIN_C4)
    return r


def recipe(cell: str) -> dict:
    """The run's recipe: the protocol above, one method."""
    if suite_of(cell) == "blocks":
        return resumable(block_recipe(cell))
    if suite_of(cell) == "extend":
        return resumable(extend_recipe(cell))
    method, ratio, opts, _ = CELLS[cell]
    r: dict = {"model": {"name": PROTOCOL["model"], "device": "cpu", "dtype": "float32"}, "eval": EVAL,
               "eval_dense": False}
    if method == "llm-pruner":
        r["calib"] = {"dataset": "c4", "samples": 16, "seqlen": 512, "seed": 0}
        r["prune"] = {"method": method, "ratio": ratio, **opts}
        r["recover"] = dict(TRAIN)
    elif method == "loraprune":
        r["prune"] = {"method": method, "ratio": ratio, "train": dict(TRAIN), **opts}
    elif method == "lorashear":  # the budget split in half: LHSPG, then dynamic recovery (its own data mix)
        half = {k: v for k, v in TRAIN.items() if k not in ("data", "seed")} | {"steps": STEPS // 2}
        r["prune"] = {"method": method, "ratio": ratio, "train": dict(half), "recovery": dict(half), **opts}
    return resumable(r)


def resumable(r: dict) -> dict:
    """Checkpoint every training stage of a recipe every SAVE_EVERY steps, so a cell stopped by the end
    of a sitting continues from there (`shearkit run --resume`) instead of starting again."""
    for sec in (r.get("recover"), (r.get("prune") or {}).get("train"), (r.get("prune") or {}).get("recovery")):
        if isinstance(sec, dict):
            sec.setdefault("save_every", SAVE_EVERY)
    return r


def run_cell(cell: str, budget_s: int, fresh: bool = False) -> dict:
    """Run one cell in a child process and return its row (status ok | failed | timeout); an unfinished
    run directory of the cell is resumed unless `fresh`."""
    out = WORK / cell
    out.mkdir(parents=True, exist_ok=True)
    rec = out / "recipe.yaml"
    rec.write_text(yaml.safe_dump(recipe(cell), sort_keys=False))
    method, ratio, opts, final = spec(cell)
    row = {"key": cell, "method": method, "ratio": ratio, "options": opts, "final": final, "suite": suite_of(cell),
           "protocol": protocol(cell), "machine": machine(), "threads": 1, "date": today()}
    if suite_of(cell) == "blocks":
        row["blocks"] = int(ratio)  # ShortGPT / FlexiGPT: K of the model's 30 blocks (the paper's "30%" = 9)
        row["ratio"] = recipe(cell)["prune"].get("ratio", round(ratio / 30, 4))
    if suite_of(cell) == "extend":
        row["blocks_added"] = int(ratio)
    t0 = time.perf_counter()
    if method == "dense":
        cmd = ["eval", PROTOCOL["model"], "--tasks", ",".join(EVAL["tasks"]), "--seqlen", str(EVAL["seqlen"]),
               "--limit", str(EVAL["limit"]), "--out", str(out / "run"), "--overwrite", "--device", "cpu"]
    else:  # an unfinished run of this cell (an earlier sitting ended) continues from its checkpoints
        from shearkit.runs import read_marker

        marker = read_marker(out / "run")
        resume = marker is not None and marker.get("status") != "complete" and not fresh
        row["resumed"] = resume
        cmd = ["run", str(rec), "--out", str(out / "run"), "--resume" if resume else "--overwrite"]
        if method == "extend":
            cmd = ["extend", "--recipe", str(rec), "--out", str(out / "run"), "--resume" if resume else "--overwrite"]
    err = run_shearkit(cmd, budget_s)
    row["wall_s"] = time.perf_counter() - t0
    if err is not None:
        return {**row, **err}
    return read_run(out / "run", row)


def carry_measurements(old: dict | None, new: dict) -> dict:
    """A re-run (--redo) that reproduces a row's perplexities exactly has built the same model: the old
    row's zero-shot and speed measurements still describe it, so they stay (otherwise they are dropped)."""
    same = old is not None and new.get("status") == "ok" and all(
        old.get(k) is not None and old.get(k) == new.get(k) for k in ("wikitext2", "ptb"))
    if same:
        new.update({k: old[k] for k in ("zeroshot", "zeroshot_protocol", "zeroshot_s", "speed")
                    if k in old and k not in new})
    return new


def read_run(run: Path, row: dict) -> dict:
    """Fill a row from a finished run directory (metrics.json, plan.json); a LoRAShear cell's records the
    docs need are copied to bench/results/ on the way (keep_lorashear_records)."""
    m = json.loads((run / "metrics.json").read_text())
    tasks = m["tasks"]
    row.update(status="ok", wikitext2=tasks["wikitext2"]["value"], ptb=tasks["ptb"]["value"])
    if "prune" in m:
        row.update(ratio_achieved=m["prune"]["ratio_achieved"], prune_s=m["prune"]["wall_s"],
                   prune_peak_mib=m["prune"]["peak_memory_bytes"] / 2**20)
    if "recover" in m:
        row.update(recover_s=m["recover"]["wall_s"], train_tokens=m["recover"]["budget"]["tokens"],
                   train_loss_last=m["recover"].get("loss_last"))
    plan = run / "plan.json"
    if plan.exists():
        pl = json.loads(plan.read_text())
        extra = pl.get("extra", {})
        layers = pl.get("layers") or {}
        if layers:  # where a structured plan cut: KV groups and MLP channels removed, the most in one layer
            kv = [len(v.get("kv_groups", [])) for v in layers.values()]
            ch = [len(v.get("mlp_channels", [])) for v in layers.values()]
            row.update(kv_groups_removed=sum(kv), mlp_channels_removed=sum(ch), max_mlp_channels_removed=max(ch),
                       layers_cut=sum(1 for a, b in zip(kv, ch) if a or b))
        if "train" in extra:  # loraprune: the training happened while pruning
            row.update(train_tokens=extra["train"]["budget"]["tokens"], train_loss_last=extra["train"]["loss_last"])
        if "lhspg" in extra:  # lorashear: LHSPG training, then its own recovery
            stages = [extra["lhspg"]["train"], extra["recovery"]["train"]]
            row.update(train_tokens=sum(t["budget"]["tokens"] for t in stages), train_loss_last=stages[1]["loss_last"],
                       unprunable=extra.get("unprunable"), recovery_rounds=extra["recovery"]["rounds"])
            keep_lorashear_records(run, row["key"], layers)
    if "extend" in m:  # the extension: blocks added and their training
        e = m["extend"]
        row.update(blocks_after=e["blocks_after"], train_tokens=e["train"]["budget"]["tokens"],
                   train_loss_last=e["train"]["loss_last"], recover_s=e["train"].get("time_s"))
    if "params" in m:
        row["params"] = m["params"]
    return row


def keep_lorashear_records(run: Path, cell: str, layers: dict) -> None:
    """What a LoRAShear cell's run directory holds that the docs need, kept in bench/results/ (the run
    directory is not): its knowledge-distribution record and plot (knowledge_distribution_<cell>.json /
    .png) and the units its plan removed per layer (`layers`, from plan.json: units_removed_<cell>.json)."""
    from shearkit.analysis.sensitivity import plot_sensitivity
    from shearkit.io.atomic import write_json, write_text

    src = run / "lorashear" / "knowledge_distribution.json"
    if not src.exists():
        return
    out = ROOT / "bench" / "results"
    record = json.loads(src.read_text())
    write_json(out / f"knowledge_distribution_{cell}.json", record)
    plot_sensitivity(record, out / f"knowledge_distribution_{cell}.png")
    kept = {i: {k: e[k] for k in ("kv_groups", "mlp_channels") if e.get(k)} for i, e in layers.items()}
    write_text(out / f"units_removed_{cell}.json", json.dumps({"cell": cell, "layers": kept}) + "\n")  # compact


def model_dir(cell: str) -> str:
    return PROTOCOL["model"] if spec(cell)[0] == "dense" else str(WORK / cell / "run" / "model")


def zeroshot_cell(row: dict, budget_s: int) -> dict:
    """Zero-shot scores of a final row's kept model (one child process)."""
    out = WORK / row["key"] / "zeroshot"
    cmd = ["eval", model_dir(row["key"]), "--tasks", ",".join(ZEROSHOT["tasks"]), "--limit", str(ZEROSHOT["limit"]),
           "--out", str(out), "--overwrite", "--device", "cpu"]
    t0 = time.perf_counter()
    err = run_shearkit(cmd, budget_s)
    if err is not None:
        return {**row, "zeroshot_attempt": {**err, "date": today()}}
    tasks = json.loads((out / "metrics.json").read_text())["tasks"]
    zs = {name: {"value": t["value"], "metric": t["metric"], "stderr": t.get("stderr", {}).get(t["metric"])}
          for name, t in tasks.items()}
    return {**row, "zeroshot": zs, "zeroshot_protocol": ZEROSHOT, "zeroshot_s": time.perf_counter() - t0}


def speed_cell(row: dict, repeats: int) -> dict:
    """Size and prefill / decode tokens/s of a row's kept model against the dense model, each in a
    child process of its own with the repeats interleaved (`shearkit.bench`)."""
    import shearkit

    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the children time one thread, as the cells ran
    r = shearkit.bench(model_dir(row["key"]), PROTOCOL["model"], labels=[row["key"], "dense"], device="cpu",
                       dtype="float32", repeats=repeats)
    me, dense = r[row["key"]], r["dense"]
    med = lambda d, what: d[f"{what}_tokens_per_s"]["median"]  # noqa: E731
    return {**row, "speed": {"params": me["params"], "disk_bytes": me["disk_bytes"],
                             "params_dense": dense["params"], "disk_bytes_dense": dense["disk_bytes"],
                             "prefill_tok_s": med(me, "prefill"), "decode_tok_s": med(me, "decode"),
                             "prefill_tok_s_dense": med(dense, "prefill"), "decode_tok_s_dense": med(dense, "decode"),
                             "setting": me.get("setting"), "date": today(), "machine": machine()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="width", help="which comparison's cells (default width)")
    ap.add_argument("--cells", default=None, help="comma-separated subset of the suite's cells (default: all)")
    ap.add_argument("--budget", type=int, default=5400, help="seconds per cell before it is stopped")
    ap.add_argument("--redo", action="store_true", help="run cells again even when they have a row (a re-run that reproduces the row's "
                    "perplexities keeps its zero-shot and speed)")
    ap.add_argument("--zeroshot", action="store_true", help="zero-shot scores for the final rows that lack them")
    ap.add_argument("--speed", action="store_true", help="size and speed against dense for rows that lack them")
    ap.add_argument("--repeats", type=int, default=5, help="--speed: interleaved repeats")
    ap.add_argument("--reread", action="store_true", help="refill finished rows from their kept run directories")
    a = ap.parse_args()
    suite = SUITES[a.suite]
    cells = [c.strip() for c in (a.cells or ",".join(suite)).split(",") if c.strip()]
    known = [c for cells_ in SUITES.values() for c in cells_]
    unknown = [c for c in cells if c not in known]
    if unknown:
        raise SystemExit(f"unknown cell(s) {', '.join(unknown)}; cells: {', '.join(known)}")
    for i, cell in enumerate(cells, 1):
        row = RESULTS.load().get(cell)
        done = row is not None and row.get("status") == "ok"
        if a.reread:
            if done and (WORK / cell / "run" / "metrics.json").exists():
                RESULTS.save(read_run(WORK / cell / "run", dict(row)))
                print(f"[{i}/{len(cells)}] {cell}: re-read", flush=True)
            continue
        if a.zeroshot or a.speed:
            if done and a.zeroshot and row.get("final") and "zeroshot" not in row:
                print(f"[{i}/{len(cells)}] {cell}: zero-shot ...", flush=True)
                RESULTS.save(zeroshot_cell(row, a.budget))
            if done and a.speed and "speed" not in row and spec(cell)[0] != "dense":
                print(f"[{i}/{len(cells)}] {cell}: speed ...", flush=True)
                RESULTS.save(speed_cell(row, a.repeats))
            continue
        if done and row.get("protocol") == protocol(cell) and not a.redo:
            print(f"[{i}/{len(cells)}] {cell}: done already, skipped", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {cell}: running ...", flush=True)
        new = run_cell(cell, a.budget, fresh=a.redo)
        RESULTS.save(carry_measurements(row, new))
        print(f"    {new.get('status')}: wikitext2 {new.get('wikitext2')}, ptb {new.get('ptb')}, "
              f"{new['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
