"""LoRA training throughput of the built-in model, and its ratio to this machine's compute limit.

    SHEARKIT_DATA=../shared/data nice -n 10 python bench/bench_train_throughput.py --label after

Trains LoRA (the recovery defaults: r 8, alpha 16, dropout 0.05, every block projection) on alpaca
at batch x seqlen (default 4 x 256, the training-benchmark protocol's) with the shared `Trainer`:
`--warmup` steps, then `--steps` timed steps (tokens/s = real input tokens of the timed steps / their
wall time). The limit: the same steps run again under `torch.utils.flop_counter.FlopCounterMode`
(forward + backward FLOPs of every step, padding included, as computed) give FLOPs per token; this
machine's fp32 matmul rate (the best of timed square `torch.matmul`s, just before and just after
the timed steps, averaged) over that is the tokens/s a
step doing nothing but matmuls at that rate would reach; the ratio is tokens/s / limit.

The result is stored under `--label` in bench/results/train_throughput.json (other labels kept).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import shearkit
from shearkit.io.atomic import write_json
from shearkit.recovery.config import RecoverConfig
from shearkit.recovery.data import build_train_data
from shearkit.recovery.loop import Callback, Trainer
from shearkit.recovery.sampling import StepSampler


def matmul_rate(n: int, repeats: int) -> float:
    """Best fp32 FLOP/s of an (n, n) @ (n, n) matmul on this machine (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


class StepClock(Callback):
    """Wall time and real input tokens of the steps after the first `warmup`; the matmul rate just
    before them (the machine may be shared: the rate is measured again after them)."""

    def __init__(self, warmup: int, matmul_size: int):
        self.warmup, self.size, self.t0, self.tokens0 = warmup, matmul_size, None, 0
        self.time_s = self.tokens = self.rate = 0.0

    def on_train_begin(self, trainer):
        if self.warmup == 0:
            self.rate = matmul_rate(self.size, repeats=5)
            self.t0 = time.perf_counter()

    def on_step_end(self, trainer, step, record):
        if step == self.warmup:
            self.rate = matmul_rate(self.size, repeats=5)
            self.t0, self.tokens0 = time.perf_counter(), record["tokens_seen"]
        elif step > self.warmup:
            self.time_s, self.tokens = time.perf_counter() - self.t0, record["tokens_seen"] - self.tokens0


class FlopCount(Callback):
    """FLOPs of the whole run (forward, backward and optimizer matmuls) as torch counts them."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False)
        self.flops = 0

    def on_train_begin(self, trainer):
        self.mode.__enter__()

    def on_train_end(self, trainer, history):
        self.mode.__exit__(None, None, None)
        self.flops = self.mode.get_total_flops()


class Shifted:
    """A sampler giving the batches of `base` from step `offset` on (to recount the timed steps)."""

    def __init__(self, base: StepSampler, offset: int):
        self.base, self.offset = base, offset

    def indices(self, step, micro, process=0):
        return self.base.indices(step + self.offset, micro, process)

    def epochs(self, steps):
        return self.base.epochs(steps)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def trainer_for(model, tok, train, cfg, callbacks, sampler=None) -> Trainer:
    from accelerate.utils import set_seed
    from peft import get_peft_model

    from shearkit.recovery.lora import lora_config

    set_seed(cfg.seed)
    peft_model = get_peft_model(model, lora_config(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules))
    return Trainer(peft_model, tok, train, cfg, callbacks=callbacks, sampler=sampler, desc="bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--data", default="alpaca")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--loss-chunk", type=int, default=None, help="recover.loss_chunk (default: the config's)")
    ap.add_argument("--checkpointing", action="store_true", help="recompute activations in the backward pass")
    ap.add_argument("--label", default="current")
    ap.add_argument("--data-dir", default=os.environ.get("SHEARKIT_DATA"))
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    a = ap.parse_args()

    extra = {} if a.loss_chunk is None else {"loss_chunk": a.loss_chunk}
    cfg = RecoverConfig(data=a.data, steps=a.warmup + a.steps, batch_size=a.batch, seqlen=a.seqlen,
                        data_dir=a.data_dir, gradient_checkpointing=a.checkpointing, **extra)
    model, tok = shearkit.load(a.model, device="cpu", dtype="float32")
    train = build_train_data(tok, a.data, seqlen=a.seqlen, data_dir=a.data_dir)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    clock = StepClock(a.warmup, a.matmul_size)
    trainer = trainer_for(model, tok, train, cfg, [clock])
    h = trainer.fit()
    peft_model = trainer.model

    # the timed steps again, counted (fresh adapters on the same base weights, same batches)
    model = peft_model.unload()
    model.load_state_dict(base_state)
    count = FlopCount()
    ccfg = RecoverConfig(**{**cfg.to_dict(), "steps": a.steps})
    shifted = Shifted(StepSampler(len(train), a.batch, 1, 1, cfg.seed), a.warmup)
    hc = trainer_for(model, tok, train, ccfg, [count], sampler=shifted).fit()
    assert hc["budget"]["tokens"] == clock.tokens, "the counted steps are not the timed ones"

    rates = [clock.rate, matmul_rate(a.matmul_size, repeats=5)]  # just before and after the timed steps
    rate = sum(rates) / 2
    tokens_per_s = clock.tokens / clock.time_s
    flops_per_token = count.flops / clock.tokens
    limit = rate / flops_per_token
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    row = {
        "model": a.model, "data": a.data, "batch": a.batch, "seqlen": a.seqlen, "dtype": "float32",
        "lora": h["lora"], "loss_chunk": cfg.loss_chunk, "gradient_checkpointing": cfg.gradient_checkpointing,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "warmup_steps": a.warmup, "timed_steps": a.steps,
        "tokens": clock.tokens, "time_s": round(clock.time_s, 3), "tokens_per_s": round(tokens_per_s, 2),
        "flops_per_step": count.flops / a.steps, "flops_per_token": round(flops_per_token),
        "matmul_gflops": round(rate / 1e9, 2), "matmul_gflops_before_after": [round(r / 1e9, 2) for r in rates],
        "matmul_size": a.matmul_size,
        "limit_tokens_per_s": round(limit, 2), "ratio": round(tokens_per_s / limit, 4),
        "losses": h["losses"], "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "load_average": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
    }
    out = Path(a.out)
    import json

    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("runs", {})[a.label] = row
    write_json(out, results)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
