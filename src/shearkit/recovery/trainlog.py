"""The training log (`train_log.jsonl`, one JSON record per logged step) and its loss-curve plot."""
from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_file, write_text


class TrainLog:
    """Append-only JSONL log; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        self._rewrite()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(records: list[dict], path: Path, title: str = "LoRA recovery") -> Path | None:
    """Loss (and eval perplexity, when logged) against step, written as a PNG (Agg backend)."""
    steps = [r["step"] for r in records if "loss" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    losses = [r["loss"] for r in records if "loss" in r]
    ax.plot(steps, losses, lw=0.8, alpha=0.5 if len(losses) > 10 else 1.0, color="C0", label="train loss")
    if len(losses) > 10:  # per-batch losses are noisy; show the trend
        ema, smooth = losses[0], []
        for x in losses:
            ema = 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax.plot(steps, smooth, lw=1.6, color="C0", label="smoothed (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    evals = [(r["step"], r["eval_ppl"]) for r in records if r.get("eval_ppl")]
    if evals:
        ax2 = ax.twinx()
        for k, task in enumerate(sorted({t for _, e in evals for t in e})):
            pts = [(s, e[task]) for s, e in evals if task in e]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o--", color=f"C{k + 1}", label=f"{task} ppl")
        ax2.set_ylabel("perplexity")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
