"""The divergence guard: judges each step's loss so training stops before it ruins the adapters."""
from __future__ import annotations

import math

# stop reasons after which the trainer restored the last good weights (the run did not finish as planned)
STOPS = ("nan", "diverged")


def diverged(history: dict | None) -> bool:
    """Whether a training history ended in a NaN/divergence stop (its weights are those of
    `history["restored_to_step"]`; `history["stop_message"]` says where and what to change)."""
    return bool(history) and history.get("stopped") in STOPS


class DivergenceGuard:
    """Tracks the smoothed loss; judges each step's loss `ok`, `suspect` or a stop reason."""

    def __init__(self, factor: float, patience: int, beta: float = 0.9):
        self.factor, self.patience, self.beta = factor, patience, beta
        self.ema: float | None = None
        self.best = math.inf
        self.streak = 0

    def check(self, loss: float) -> str:
        """`ok`, `suspect` (above the threshold, within patience), `nan` or `diverged`."""
        if not math.isfinite(loss):
            return "nan"
        if self.factor > 0 and math.isfinite(self.best) and loss > self.factor * self.best:
            self.streak += 1
            return "diverged" if self.streak >= self.patience else "suspect"
        self.streak = 0
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        self.best = min(self.best, self.ema)
        return "ok"

    def state(self) -> dict:
        return {"ema": self.ema, "best": self.best if math.isfinite(self.best) else None, "streak": self.streak}

    def load(self, s: dict) -> None:
        self.ema, self.streak = s["ema"], s["streak"]
        self.best = math.inf if s["best"] is None else s["best"]
