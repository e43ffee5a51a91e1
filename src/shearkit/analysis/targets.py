"""From measured sensitivities to per-structure pruning targets that reach the overall ratio.

The most sensitive fraction gamma of the node groups (layer x attention / MLP) is kept whole;
what they cannot give is taken from the others (LoRAShear's pitfall: the ratio is of the whole
model, so the prunable groups carry more). Every prunable node group gives the same fraction f of
its parameters, capped at what it can give (at least one KV group and `round_to` MLP channels
stay), with f found by water-filling; the shares are then rounded to whole units (one KV group,
or an MLP chunk as the planner cuts it) and units added, largest remainder first, until the
removed parameters first reach the target: the result overshoots it by less than one unit.
Equal remainders (node groups of equal size) go to the least sensitive first, so coarse units
(SmolLM2 has 3 KV groups per layer) land where they hurt least, not by layer order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.modules import unwrap
from ..errors import ShearkitError
from ..graph.groups import kv_groups, mlp_channels
from ..graph.planner import _attn_seq, _mlp_seq
from ..graph.removal import layer_geometry, layer_params_after

KINDS = ("attn", "mlp")


@dataclass
class NodeUnits:
    """The removal units of one node group, in the planner's terms."""

    layer: int
    kind: str  # attn | mlp
    full: int  # KV groups, or MLP channels
    params: int  # parameters of the whole structure
    unit_sizes: list[int]  # KV groups / channels each successive unit removes
    unit_costs: list[int]  # parameters each successive unit removes

    @property
    def removable(self) -> int:
        return sum(self.unit_costs)


def node_units(model: nn.Module, round_to: int = 8) -> list[NodeUnits]:
    """Every node group of `model` (layer-major, attention then MLP) with its units."""
    m = unwrap(model)
    out = []
    for i, g in enumerate(layer_geometry(m)):
        kv = kv_groups(m, i)
        a = _attn_seq(m, i, g, {("kv_group", i): torch.zeros(kv.size)}, "kv_group")
        out.append(NodeUnits(i, "attn", g["kv_heads"], int(kv.param_counts(m).sum()),
                             [len(u) for u in a.units], list(a.costs)))
        mlp = mlp_channels(m, i)
        per = int(mlp.param_counts(m)[0])
        s = _mlp_seq(i, torch.zeros(mlp.size), per, round_to)
        out.append(NodeUnits(i, "mlp", g["mlp"], int(mlp.param_counts(m).sum()),
                             [len(u) for u in s.units], list(s.costs)))
    return out


def most_sensitive(deviations: list[float], gamma: float) -> list[int]:
    """Indices of the ceil(gamma x n) largest deviations (ties: the earlier node group first)."""
    if not 0.0 <= gamma < 1.0:
        raise ShearkitError(f"gamma must be in [0, 1), got {gamma}.")
    k = math.ceil(gamma * len(deviations) - 1e-9)
    order = sorted(range(len(deviations)), key=lambda j: (-deviations[j], j))
    return sorted(order[:k])


def allocate(nodes: list[NodeUnits], unprunable: set[int], ratio: float, block_params: int,
             sensitivity: list[float] | None = None) -> list[int]:
    """Units each node group loses so that the removed parameters first reach `ratio` x
    `block_params` (module docstring); unprunable node groups lose none; `sensitivity` (one value
    per node group, higher: more sensitive) breaks ties between equal remainders.

    Raises:
        ShearkitError: the prunable node groups cannot give that much.
    """
    target = ratio * block_params
    prunable = [j for j in range(len(nodes)) if j not in unprunable]
    most = sum(nodes[j].removable for j in prunable)
    if target > most + 1e-6:
        raise ShearkitError(
            f"Ratio {ratio} is unreachable with {len(unprunable)} of {len(nodes)} node groups kept whole: the others "
            f"can give at most {most / block_params:.4f} of the decoder blocks' parameters (at least one KV group "
            "and the last MLP chunk stay in each). Lower the ratio or gamma.")
    units = [0] * len(nodes)
    if target <= 0 or not prunable:
        return units

    def share(f: float) -> dict[int, float]:
        return {j: min(f * nodes[j].params, nodes[j].removable) for j in prunable}

    lo, hi = 0.0, 1.0
    for _ in range(60):  # water-filling: the common fraction f at which the shares sum to the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(share(mid).values()) < target else (lo, mid)
    want = share(hi)
    removed = 0
    rest: list[tuple[float, int]] = []
    for j in prunable:
        n, got = 0, 0
        costs = nodes[j].unit_costs
        while n < len(costs) and got + costs[n] <= want[j] + 1e-9:
            got += costs[n]
            n += 1
        units[j], removed = n, removed + got
        if n < len(costs):
            rest.append(((want[j] - got) / costs[n], j))
    sens = sensitivity or [0.0] * len(nodes)
    for _, j in sorted(rest, key=lambda t: (-round(t[0], 9), sens[t[1]], t[1])):  # largest remainder first
        if removed >= target:
            break
        removed += nodes[j].unit_costs[units[j]]
        units[j] += 1
    while removed < target:  # rounding left a gap the remainders did not close: take the cheapest units left
        j = min((j for j in prunable if units[j] < len(nodes[j].unit_costs)),
                key=lambda j: (nodes[j].unit_costs[units[j]], j))
        removed += nodes[j].unit_costs[units[j]]
        units[j] += 1
    return units


def block_params(model: nn.Module) -> int:
    """The ratio's denominator: the decoder blocks' base parameters (as the planner counts them)."""
    return sum(layer_params_after(unwrap(model)))
