"""`DynamicConfig`: the knobs of dynamic knowledge recovery (`recovery/dynamic.py`, LoRAShear Alg. 5).

Kept apart from the training code and free of torch, so a recipe section can be parsed from it
without loading the training stack.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ShearkitError


@dataclass
class DynamicConfig:
    """Knobs of dynamic recovery (the slice sizes are stated: the local sets are small, c4 ~0.27M tokens)."""

    phases: list[list[str]] = field(default_factory=lambda: [["c4", "wiki"], ["alpaca"]])  # trained in turn
    round_steps: int = 16  # optimizer steps per round; the mix is re-weighted at every round's start
    floor: float = 0.1  # share of the mix spread uniformly: each phase source gets >= floor / len(phase)
    tolerance: float = 0.01  # a phase ends when its held-out ppl improves by less than this (relative)
    adaptive: bool = True  # False: equal shares within each phase, whatever the degradation (an ablation)
    phase_steps: list[int] | None = None  # cap on each phase's steps, checked at round ends (None: until converged)
    heldout_windows: int = 8  # held-out windows per text source ...
    heldout_seqlen: int = 256  # ... of this many tokens
    heldout_examples: int = 32  # held-out records per instruction source
    eval_batch_size: int = 8  # held-out sequences per forward pass

    def __post_init__(self):
        if not self.phases or any(not p for p in self.phases):
            raise ShearkitError(f"dynamic.phases must be a non-empty list of non-empty source lists, got "
                                f"{self.phases}.")
        flat = [s for p in self.phases for s in p]
        dup = sorted({s for s in flat if flat.count(s) > 1})
        if dup:
            raise ShearkitError(f"dynamic.phases names {', '.join(dup)} more than once; each source belongs to one "
                                "phase.")
        for name in ("round_steps", "heldout_windows", "heldout_seqlen", "heldout_examples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ShearkitError(f"dynamic.{name} must be at least 1, got {getattr(self, name)}.")
        if self.heldout_seqlen < 2:
            raise ShearkitError(f"dynamic.heldout_seqlen must be at least 2, got {self.heldout_seqlen}.")
        if not 0.0 <= self.floor <= 1.0:
            raise ShearkitError(f"dynamic.floor must be in [0, 1], got {self.floor}.")
        if not self.tolerance >= 0:
            raise ShearkitError(f"dynamic.tolerance must be >= 0, got {self.tolerance}.")
        if self.phase_steps is not None and (len(self.phase_steps) != len(self.phases)
                                             or any(n < 1 for n in self.phase_steps)):
            raise ShearkitError(f"dynamic.phase_steps must give a positive number of steps for each of the "
                                f"{len(self.phases)} phases, got {self.phase_steps}.")

    def to_dict(self) -> dict:
        return asdict(self)
