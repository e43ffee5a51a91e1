"""Self-speculative decoding (FlexiGPT 4.2) against plain greedy decoding, on SmolLM2-135M with 9 of its
30 blocks replaced by weight-shared copies (FlexiGPT, rank 32), optionally trained a few steps.

    SHEARKIT_DATA=../shared/data OMP_NUM_THREADS=1 python bench/bench_speculative.py
    SHEARKIT_DATA=../shared/data python bench/bench_speculative.py --train-steps 0 --new-tokens 32

The draft is the model without the 9 replacement blocks (the ShortGPT model inside the FlexiGPT one);
the full model verifies. Decode tokens/s = generated tokens / wall time of the whole call (prompt
included; the prompts are short), best of `--repeats`, for three baselines: transformers'
`generate(do_sample=False)` (what `shearkit generate` runs), a plain greedy loop over the same
forward calls as the speculative decoder (no per-step overhead of `generate`), and the speculative
decoder at each lookahead. Every speculative output is checked token-identical to `generate`'s.
Appends a run to bench/results/speculative.json. A run takes about 3-4 minutes on one CPU thread.
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
from shearkit.speculative import _cache_kwarg, _new_cache, speculative_generate

PROMPTS = [
    "The history of the city begins in the early middle ages, when",
    "Machine learning models are trained on large amounts of data. In this article we",
    "She opened the door and looked outside. The street was",
]


@torch.inference_mode()
def greedy_loop(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Plain greedy decoding with a KV cache, one forward per token (the speculative decoder's own calls)."""
    cache, kw = _new_cache(model), _cache_kwarg(model)
    seq = ids[0].tolist()
    step = ids
    for _ in range(new_tokens):
        seq.append(int(model(input_ids=step, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[0, -1].argmax()))
        step = torch.tensor([[seq[-1]]])
    return torch.tensor([seq])


def timed(fn, repeats: int):
    """(best wall seconds, last result) of `repeats` calls of fn."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--train-steps", type=int, default=16, help="FlexiGPT training steps before measuring (c4)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--lookaheads", default="3,4,6")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    ap.add_argument("--out", default="bench/results/speculative.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = shearkit.load(a.model, device="cpu", dtype="float32")
    from shearkit.recipe import CalibConfig

    train = {"steps": a.train_steps, "data": "c4", "seqlen": 128, "batch_size": 2, "lr": 1e-3}
    plan = shearkit.prune(model, tok, "flexigpt", calib=CalibConfig(samples=8, seqlen=128), blocks=a.blocks,
                          training=a.train_steps > 0, train=train, data_dir=a.data_dir)
    model.eval()
    skipped = sorted(int(k) for k in plan.replaced)
    eos = model.generation_config.eos_token_id
    rows, totals = [], {"generate": 0.0, "greedy_loop": 0.0}
    spec_totals = {int(k): [0.0, 0, 0] for k in a.lookaheads.split(",")}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen_s, ref = timed(lambda: model.generate(ids, max_new_tokens=a.new_tokens, do_sample=False,
                                                  pad_token_id=tok.pad_token_id or eos), a.repeats)
        n_new = ref.shape[1] - ids.shape[1]
        loop_s, _ = timed(lambda: greedy_loop(model, ids, n_new), a.repeats)
        totals["generate"] += gen_s
        totals["greedy_loop"] += loop_s
        row = {"prompt": prompt, "prompt_tokens": ids.shape[1], "new_tokens": n_new, "generate_s": gen_s,
               "greedy_loop_s": loop_s, "speculative": {}}
        for k in spec_totals:
            s, out = timed(lambda: speculative_generate(model, ids, a.new_tokens, lookahead=k, skip=skipped), a.repeats)
            if not torch.equal(out.sequences, ref):
                raise SystemExit(f"speculative output differs from generate's (lookahead {k}, prompt {prompt!r})")
            spec_totals[k][0] += s
            spec_totals[k][1] += out.drafted
            spec_totals[k][2] += out.accepted
            row["speculative"][str(k)] = {"s": s, "rounds": out.rounds, "drafted": out.drafted,
                                          "accepted": out.accepted}
        rows.append(row)
    n_tokens = sum(r["new_tokens"] for r in rows)
    tps = {name: n_tokens / s for name, s in totals.items()}
    spec = {str(k): {"tokens_per_s": n_tokens / s, "vs_generate": (n_tokens / s) / tps["generate"],
                     "vs_greedy_loop": (n_tokens / s) / tps["greedy_loop"], "acceptance": acc / max(dr, 1)}
            for k, (s, dr, acc) in spec_totals.items()}
    result = {"what": "decode tokens/s, self-speculative (draft skips the replacement blocks) vs greedy",
              "model": a.model, "blocks_replaced": skipped, "rank": plan.extra["rank"],
              "train_steps": a.train_steps, "new_tokens_per_prompt": a.new_tokens, "prompts": len(PROMPTS),
              "repeats": a.repeats, "identical_to_generate": True,
              "generate_tokens_per_s": tps["generate"], "greedy_loop_tokens_per_s": tps["greedy_loop"],
              "speculative": spec, "best_vs_generate": max(v["vs_generate"] for v in spec.values()),
              "rows": rows, "machine": f"{platform.machine()}, {os.cpu_count()} cores, {a.threads} thread(s)",
              "load_average": list(os.getloadavg()), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "wall_s": time.perf_counter() - t0}
    out = Path(a.out)  # every run is kept: on a shared machine one run is not the figure
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    write_json(out, {"what": result.pop("what"), "runs": [*runs, result]})
    print({k: round(v, 2) for k, v in tps.items()},
          {k: (round(v["tokens_per_s"], 2), round(v["vs_generate"], 3), round(v["acceptance"], 3))
           for k, v in spec.items()})


if __name__ == "__main__":
    main()
