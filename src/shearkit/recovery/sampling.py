"""Which training examples each (step, micro-batch, process) uses.

A `Sampler` answers `indices(step, micro, process)` as a pure function of its state, so a
resumed run sees exactly the batches an uninterrupted run would; any state it keeps (a method's
curriculum, say) goes through `state_dict()` into the trainer's checkpoints.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Sampler(Protocol):
    """The examples of every micro-batch; `step` counts optimizer steps from 0."""

    def indices(self, step: int, micro: int, process: int = 0) -> list[int]:
        """Example indices of one micro-batch of one process."""
        ...

    def epochs(self, steps: int) -> float:
        """Passes over the data that `steps` optimizer steps make (for the run's summary)."""
        ...

    def state_dict(self) -> dict:
        """State to checkpoint (JSON-able values); empty for a pure function of the seed."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        ...


class StepSampler:
    """Walks seeded per-epoch permutations, so the order is a pure function of the seed and the
    position (exact resume without any saved state)."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, processes: int, seed: int):
        self.n, self.bs, self.ga, self.np, self.seed = n, batch_size, grad_accum, processes, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}  # keep one epoch in memory
        return self._perms[epoch]

    def indices(self, step: int, micro: int, process: int = 0) -> list[int]:
        """Example indices of one micro-batch (step counts from 0)."""
        start = ((step * self.ga + micro) * self.np + process) * self.bs
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(start, start + self.bs)]

    def epochs(self, steps: int) -> float:
        """Passes over the data that `steps` optimizer steps make."""
        return steps * self.ga * self.np * self.bs / self.n

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def process_count(model) -> int:
    """How many processes train `model`: 1, or the launcher's world size under `accelerate launch` /
    torchrun. Starts accelerate's shared state the way the `Trainer` does (`cpu=True` for a model on
    the CPU): started plainly first, on a machine without an accelerator it would take a launched run
    for one process and leave every process training alone on its share of each step."""
    from accelerate import PartialState

    return PartialState(cpu=next(model.parameters()).device.type == "cpu").num_processes
