"""Pruning-ratio schedules for methods that prune while they train."""
from __future__ import annotations


def cubic_ratio(step: int, total: int, target: float, *, warmup: float = 0.1, cooldown: float = 0.1,
                initial: float = 0.0) -> float:
    """The ratio to have pruned after optimizer step `step` of `total` (LoRAPrune, after Zhu & Gupta 2017).

    `initial` through the first `warmup` fraction of the steps, `target` through the last `cooldown`
    fraction, and in between a cubic rise that is fast at first and flattens towards the target.
    """
    t0 = warmup * total
    t1 = total - cooldown * total
    if step <= t0:
        return initial
    if step > t1 or t1 <= t0:
        return target
    return target + (initial - target) * (1.0 - (step - t0) / (t1 - t0)) ** 3
