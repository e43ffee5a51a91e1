"""Training on a weighted mixture of several sources, with weights that may change during training.

`MixtureData` joins one `TrainData` per source into the single example list the Trainer takes
and remembers which index range each source holds. `MixtureSampler` decides every example slot
of every step: it picks a source with the weights of the round the step falls in (seeded per
step), and within a source walks seeded permutations without replacement. Which example a slot
gets is a pure function of the seed and the table of rounds, so a run resumed from the sampler's
`state_dict()` (that table) draws exactly what an uninterrupted run would. Weights are set per
round with `set_weights(start_step, weights)`, e.g. by LoRAShear's dynamic recovery
(`recovery/dynamic.py`); a source of weight 0 is never drawn.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from ..errors import ShearkitError
from .data import TrainData


@dataclass
class MixtureData:
    """Several sources' examples in one `TrainData`; `ranges[source]` = (start, stop) of its examples."""

    data: TrainData
    ranges: dict[str, tuple[int, int]]
    records: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def join(cls, sources: dict[str, TrainData]) -> MixtureData:
        """Concatenate the sources (in the order given); mode "mixed" when their modes differ."""
        if not sources:
            raise ShearkitError("A training mixture needs at least one source.")
        empty = [k for k, d in sources.items() if len(d) == 0]
        if empty:
            raise ShearkitError(f"Mixture sources {', '.join(empty)} hold no training examples; give them more data.")
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        ranges: dict[str, tuple[int, int]] = {}
        for name, d in sources.items():
            ranges[name] = (len(ids), len(ids) + len(d))
            ids += d.input_ids
            labels += d.labels
        modes = {d.mode for d in sources.values()}
        mode = modes.pop() if len(modes) == 1 else "mixed"
        records = {k: d.record for k, d in sources.items()}
        record = {"mode": mode, "examples": len(ids), "sources": records,
                  "seqlen": max(d.record.get("seqlen", 0) for d in sources.values())}
        return cls(TrainData(ids, labels, mode, record), ranges, records)


def _normalise(weights: dict[str, float], sources: list[str]) -> dict[str, float]:
    """Weights over every source (missing ones 0), summing to 1; a clear error for bad ones."""
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise ShearkitError(f"Mixture weights name {', '.join(unknown)}, which are not sources of the mixture "
                            f"({', '.join(sources)}).")
    w = {s: float(weights.get(s, 0.0)) for s in sources}
    if any(not v >= 0 or v == float("inf") for v in w.values()):
        raise ShearkitError(f"Mixture weights must be finite and >= 0, got {weights}.")
    total = sum(w.values())
    if total <= 0:
        raise ShearkitError(f"At least one mixture weight must be positive, got {weights}.")
    return {s: v / total for s, v in w.items()}


class MixtureSampler:
    """A `recovery.sampling.Sampler` drawing each example slot from a source chosen by the round's weights
    (see the module docstring). Initial weights: `weights`, else proportional to the sources' sizes."""

    def __init__(self, ranges: dict[str, tuple[int, int]], batch_size: int, grad_accum: int, processes: int,
                 seed: int, weights: dict[str, float] | None = None):
        if not ranges:
            raise ShearkitError("A mixture sampler needs at least one source.")
        self.ranges = {k: (int(a), int(b)) for k, (a, b) in ranges.items()}
        self.sources = list(self.ranges)
        self.bs, self.ga, self.np, self.seed = batch_size, grad_accum, processes, seed
        self.slots = batch_size * grad_accum * processes  # example slots per optimizer step
        self.rounds: list[tuple[int, dict[str, float]]] = []
        self._offsets: list[dict[str, int]] = []  # _offsets[t]: draws per source in steps < t
        self._perms: dict[tuple[str, int], list[int]] = {}
        self.set_weights(0, weights or {s: b - a for s, (a, b) in self.ranges.items()})

    # -- rounds -------------------------------------------------------------------------------------

    def set_weights(self, start_step: int, weights: dict[str, float]) -> None:
        """From 0-based optimizer step `start_step` on, draw sources with `weights` (normalised);
        rounds that started at or after `start_step` are replaced."""
        if start_step < 0:
            raise ShearkitError(f"A round cannot start before step 0 (got {start_step}).")
        w = _normalise(weights, self.sources)
        self.rounds = [r for r in self.rounds if r[0] < start_step] + [(int(start_step), w)]
        del self._offsets[start_step + 1:]  # draws of steps >= start_step may change

    def weights_at(self, step: int) -> dict[str, float]:
        """The weights of the round that 0-based `step` falls in."""
        starts = [r[0] for r in self.rounds]
        return self.rounds[bisect.bisect_right(starts, step) - 1][1]

    # -- draws --------------------------------------------------------------------------------------

    def _step_sources(self, step: int) -> list[int]:
        """Source index of every slot of `step` (seeded by the step: independent of other steps' weights)."""
        w = self.weights_at(step)
        cum, total = [], 0.0
        for s in self.sources:
            total += w[s]
            cum.append(total)
        last = max(i for i, s in enumerate(self.sources) if w[s] > 0)  # float round-off at the top end
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(self.slots, generator=g, dtype=torch.float64).tolist()
        return [min(bisect.bisect_right(cum, x), last) for x in u]

    def _offset(self, step: int) -> dict[str, int]:
        """Draws per source over steps 0..step-1 (cached; recomputed after weights change)."""
        if not self._offsets:
            self._offsets.append({s: 0 for s in self.sources})
        while len(self._offsets) <= step:
            t = len(self._offsets) - 1
            counts = dict(self._offsets[t])
            for i in self._step_sources(t):
                counts[self.sources[i]] += 1
            self._offsets.append(counts)
        return self._offsets[step]

    def _perm(self, source: str, epoch: int) -> list[int]:
        key = (source, epoch)
        if key not in self._perms:
            a, b = self.ranges[source]
            k = self.sources.index(source)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1009 + k)
            if len(self._perms) > 4 * len(self.sources):
                self._perms.clear()
            self._perms[key] = (a + torch.randperm(b - a, generator=g)).tolist()
        return self._perms[key]

    def indices(self, step: int, micro: int, process: int = 0) -> list[int]:
        """Example indices of one micro-batch of one process (`step` counts optimizer steps from 0)."""
        picks = self._step_sources(step)
        seen = dict(self._offset(step))
        first = (micro * self.np + process) * self.bs
        out = []
        for slot, i in enumerate(picks[: first + self.bs]):
            s = self.sources[i]
            c = seen[s]
            seen[s] = c + 1
            if slot >= first:
                n = self.ranges[s][1] - self.ranges[s][0]
                out.append(self._perm(s, c // n)[c % n])
        return out

    def drawn(self, steps: int) -> dict[str, int]:
        """Examples drawn from each source in the first `steps` optimizer steps."""
        return dict(self._offset(steps))

    def epochs(self, steps: int) -> float:
        """Passes over the whole mixture that `steps` optimizer steps make."""
        return steps * self.slots / max(1, sum(b - a for a, b in self.ranges.values()))

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The table of rounds (JSON-able): with the seed, it fixes every draw."""
        return {"rounds": [[start, dict(w)] for start, w in self.rounds]}

    def load_state_dict(self, state: dict) -> None:
        rounds = state.get("rounds")
        if not rounds:
            return
        missing = [s for _, w in rounds for s in self.sources if s not in w]
        if missing or any(set(w) - set(self.sources) for _, w in rounds):
            raise ShearkitError(f"The checkpointed mixture rounds name other sources than this mixture "
                                f"({', '.join(self.sources)}); resume with the same sources.")
        self.rounds = [(int(start), {s: float(w[s]) for s in self.sources}) for start, w in rounds]
        self._offsets = []
