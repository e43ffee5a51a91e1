"""`RecoverConfig`: every knob of a LoRA recovery run (the `recover:` section of a recipe).

```yaml
recover:
  steps: 200            # optimizer updates
  data: alpaca          # named set (alpaca, lima, gsm8k, c4, wiki) or a .json/.jsonl/.txt path
  seqlen: 512           # packed window (text) or maximum length (instructions)
  batch_size: 4
  grad_accum: 4         # effective batch = batch_size x grad_accum x processes
  lr: 2.0e-4
  rank: 8
  alpha: 16
```
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ShearkitError

SCHEDULES = ("cosine", "linear", "constant")
MODES = ("auto", "instruction", "text")


@dataclass
class RecoverConfig:
    """LoRA recovery settings.

    Practical values: rank 8 / alpha 16 on every linear projection of the blocks is the common
    choice in the pruning papers (LLM-Pruner, LoRAPrune, LoRAShear); lr 1e-4..3e-4 for LoRA.
    The recovery budget in tokens is `steps x batch_size x grad_accum x processes x seqlen`
    (an upper bound for instruction data, which is padded per batch, not packed).
    """

    steps: int = 200  # optimizer updates (each = batch_size x grad_accum sequences per process)
    data: str = "alpaca"  # named set or a file path
    mode: str = "auto"  # auto (from the set's kind / the file's records) | instruction | text
    split: str | None = None  # text sets: the split to train on (default: train)
    seqlen: int = 512  # text: packed window length; instructions: maximum tokens per example
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | linear | constant (each after a linear warm-up)
    warmup: float = 0.05  # < 1: fraction of `steps`; >= 1: a number of steps
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: every linear projection of the blocks
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # > 0: perplexity before training, every N steps, and at the end
    eval_tasks: list[str] = field(default_factory=lambda: ["wikitext2"])
    eval_limit: int | None = 4  # windows per perplexity set (quick)
    eval_seqlen: int | None = None  # default: seqlen
    save_every: int = 0  # > 0 (and an output dir): checkpoint every N steps
    log_every: int = 1
    distill_weight: float = 0.0  # 0..1: weight of the KL term against a dense teacher
    distill_temperature: float = 2.0
    divergence: float = 3.0  # stop when loss > divergence x best smoothed loss (0 disables)
    divergence_patience: int = 2  # ... for this many consecutive steps
    gradient_checkpointing: bool = False  # recompute activations in backward: ~1/2 the memory, 1.4-1.8x the time
    loss_chunk: int = 256  # output head + loss on this many tokens at a time (0: all logits at once); no slower
    seed: int = 0
    merge: bool = True  # merge adapters into the weights on return (merge_and_unload)
    save_adapter: bool = False  # also write the adapters (peft format) to <out>/recovery/adapter
    data_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = [t.strip() for t in self.eval_tasks.split(",") if t.strip()]
        positive = {"steps": self.steps, "seqlen": self.seqlen, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "rank": self.rank, "log_every": self.log_every,
                    "divergence_patience": self.divergence_patience}
        for name, v in positive.items():
            if v < 1:
                raise ShearkitError(f"recover.{name} must be at least 1, got {v}.")
        if self.seqlen < 2:
            raise ShearkitError(f"recover.seqlen must be at least 2, got {self.seqlen}.")
        if self.loss_chunk < 0:
            raise ShearkitError(f"recover.loss_chunk must be 0 (off) or a number of tokens, got {self.loss_chunk}.")
        if not self.lr > 0:
            raise ShearkitError(f"recover.lr must be positive, got {self.lr}.")
        if self.alpha <= 0:
            raise ShearkitError(f"recover.alpha must be positive, got {self.alpha}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ShearkitError(f"recover.dropout must be in [0, 1), got {self.dropout}.")
        if self.schedule not in SCHEDULES:
            raise ShearkitError(f"recover.schedule must be one of {', '.join(SCHEDULES)}, got '{self.schedule}'.")
        if self.mode not in MODES:
            raise ShearkitError(f"recover.mode must be one of {', '.join(MODES)}, got '{self.mode}'.")
        if self.warmup < 0:
            raise ShearkitError(f"recover.warmup must be >= 0 (a fraction of steps below 1, else steps), "
                                f"got {self.warmup}.")
        for name in ("eval_every", "save_every", "max_grad_norm", "weight_decay", "divergence"):
            if getattr(self, name) < 0:
                raise ShearkitError(f"recover.{name} must be >= 0 (0 disables it), got {getattr(self, name)}.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ShearkitError(f"recover.distill_weight must be in [0, 1], got {self.distill_weight}.")
        if self.distill_temperature <= 0:
            raise ShearkitError(f"recover.distill_temperature must be positive, got {self.distill_temperature}.")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ShearkitError(f"recover.eval_limit must be a positive number of windows, got {self.eval_limit}.")
        if self.eval_every and not self.eval_tasks:
            raise ShearkitError("recover.eval_every is set but recover.eval_tasks is empty; name a set, e.g. wikitext2.")
        if self.target_modules is not None and not self.target_modules:
            raise ShearkitError("recover.target_modules is empty; leave it unset for every linear projection.")

    @property
    def warmup_steps(self) -> int:
        """Warm-up length in optimizer steps."""
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
