"""LHSPG, LoRA Half-Space Projected Gradient (LoRAShear, Chen et al. 2023, Alg. 4): AdamW on the
LoRA factors that, period by period, drives the least salient prunable groups of the base weights
to exactly zero while every other group keeps learning.

Schedule (optimizer steps, counted by the optimizer itself): `warmup` steps of plain AdamW (the
LoRA factors grow away from B = 0, so the LoRA-based saliency means something), then `periods`
periods of `period_steps` steps. At the first step of period p each group set (a node group: one
layer's KV groups, or its MLP channels) picks its quota for that period, the lowest-saliency
groups not yet pruned (`importance.lora_saliency`), so that after the last period it has lost
exactly its target (`quotas`). Two variants:

- `paper` (Alg. 4). After AdamW moved A and B, every selected group g takes the trial iterate
  `x~_g = [x + s B A]_g - lr * lambda_g * x_g / ||x_g||`: its LoRA update is folded into the base
  rows/columns (and its rows of B, or columns of A, reset, so the function is unchanged) and it
  is shrunk along its own direction. The half-space projection zeroes it as soon as
  `<x~_g, x_g> < epsilon ||x_g||^2`. `lambda_g = ||x_g + s (BA)_g|| / (lr * period_steps *
  (1 - epsilon))` (our reconstruction; the paper says only that lambda follows the period's
  length): with negligible gradients the group crosses the boundary by the period's last step;
  a group still non-zero then is projected anyway (counted as `forced`). At every period's end the other groups' `s B A` is merged into the base weights
  and B reset. This variant writes into the frozen base weights, so the prunable modules' base
  weights are part of the checkpointed state.
- `decay` (the released code): the selected groups' output rows are scaled by `(T - t) / T` at
  step t of the period (a forward scale on the layer output, covering the base rows and their
  LoRA update, instead of writing into the base), reaching exactly 0 at the period's end; no
  penalty, no projection, no merge.

Both end with the same group sparsity: every set loses exactly its quota. Pruned groups stay
zero (the paper variant re-zeroes their base slices, B rows and A columns after every step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch.modules import unwrap, weight_view
from ..errors import ShearkitError
from ..graph.groups import GroupSet
from ..importance.lora_grad import lora_of

VARIANTS = ("paper", "decay")


@dataclass
class _Slice:
    """One coupled slice of a group set: rows (dim 0, with the bias) or columns (dim 1) of a base weight."""

    name: str  # the base module's path
    weight: torch.Tensor  # (out, in) view of the base weight
    bias: torch.Tensor | None
    dim: int
    index: torch.Tensor  # (groups, k)
    lora: tuple[nn.Parameter, nn.Parameter, float] | None  # A (r, in), B (out, r), scaling


@dataclass
class _Set:
    size: int
    slices: list[_Slice] = field(default_factory=list)


def build_sets(model: nn.Module, sets: dict[tuple[str, int], GroupSet]) -> dict[tuple[str, int], _Set]:
    """The tensors every group of `sets` touches (base slices with their LoRA factors)."""
    m = unwrap(model)
    out = {}
    for key, gs in sets.items():
        s = _Set(gs.size)
        for part in gs.base_parts():
            mod = m.get_submodule(part.module)
            bias = getattr(mod, "bias", None) if part.dim == 0 else None
            s.slices.append(_Slice(part.module, weight_view(mod), bias if isinstance(bias, torch.Tensor) else None,
                                   part.dim, part.index.to(mod.weight.device), lora_of(m, part.module)))
        out[key] = s
    return out


def _gather(sl: _Slice, j: torch.Tensor) -> torch.Tensor:
    """(len(j), entries) values of groups `j` in one slice (bias entries appended for rows)."""
    idx = sl.index[j].reshape(-1)
    n = len(j)
    if sl.dim == 0:
        v = sl.weight[idx].reshape(n, -1)
        if sl.bias is not None:
            v = torch.cat([v, sl.bias[idx].reshape(n, -1)], 1)
        return v
    return sl.weight[:, idx].T.reshape(n, -1)


def _scatter_scale(sl: _Slice, j: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply groups `j` of one slice by `factor` (one value per group)."""
    k = sl.index.shape[1]
    idx = sl.index[j].reshape(-1)
    f = factor.to(sl.weight.dtype).repeat_interleave(k)
    if sl.dim == 0:
        sl.weight[idx] *= f[:, None]
        if sl.bias is not None:
            sl.bias[idx] *= f
    else:
        sl.weight[:, idx] *= f[None, :]


def _fold(sl: _Slice, j: torch.Tensor) -> None:
    """Add groups `j`'s share of `s B A` to the base slice and reset it in the factor (function unchanged)."""
    if sl.lora is None:
        return
    a, b, s = sl.lora
    idx = sl.index[j].reshape(-1)
    if sl.dim == 0:
        sl.weight[idx] += s * (b[idx].float() @ a.float()).to(sl.weight.dtype)
        b.data[idx] = 0
    else:
        sl.weight[:, idx] += s * (b.float() @ a[:, idx].float()).to(sl.weight.dtype)
        a.data[:, idx] = 0


def _zero(sl: _Slice, j: torch.Tensor) -> None:
    """Zero groups `j` in the base slice and in its LoRA factor."""
    idx = sl.index[j].reshape(-1)
    if sl.dim == 0:
        sl.weight[idx] = 0
        if sl.bias is not None:
            sl.bias[idx] = 0
        if sl.lora is not None:
            sl.lora[1].data[idx] = 0
    else:
        sl.weight[:, idx] = 0
        if sl.lora is not None:
            sl.lora[0].data[:, idx] = 0


def period_quotas(total: int, periods: int) -> list[int]:
    """How many of `total` groups each period selects (cumulative round(total x (p+1) / P))."""
    cum = [round(total * (p + 1) / periods) for p in range(periods)]
    return [c - (cum[p - 1] if p else 0) for p, c in enumerate(cum)]


class LHSPG(torch.optim.AdamW):
    """AdamW over the LoRA factors plus LHSPG's progressive group pruning (module docstring).

    `sets`: (kind, layer) -> GroupSet of the model's prunable groups; `quotas`: groups each set
    loses in all (sets without a quota lose none); `warmup`, `periods`, `period_steps`: the
    schedule in optimizer steps; `epsilon`: the half-space boundary; `saliency`: proxy weights.
    """

    def __init__(self, params, model: nn.Module, sets: dict[tuple[str, int], GroupSet], quotas: dict,
                 *, lr: float, weight_decay: float = 0.0, warmup: int, periods: int, period_steps: int,
                 variant: str = "paper", epsilon: float = 0.05, saliency: dict[str, float] | None = None):
        from ..importance.lora_saliency import check_weights, DEFAULT_WEIGHTS

        if variant not in VARIANTS:
            raise ShearkitError(f"LHSPG variant must be one of {', '.join(VARIANTS)}, got '{variant}'.")
        if warmup < 0 or periods < 1 or period_steps < 1:
            raise ShearkitError(f"LHSPG needs warmup >= 0, periods >= 1 and period_steps >= 1 (got {warmup}, "
                                f"{periods}, {period_steps}).")
        if not 0.0 <= epsilon < 1.0:
            raise ShearkitError(f"LHSPG epsilon must be in [0, 1), got {epsilon}.")
        super().__init__(params, lr=lr, weight_decay=weight_decay)
        self.model = unwrap(model)
        self.group_sets = {k: v for k, v in sets.items() if int(quotas.get(k, 0)) > 0}
        for k, gs in self.group_sets.items():
            if not 0 <= int(quotas[k]) < gs.size:
                raise ShearkitError(f"LHSPG quota {quotas[k]} for {k[0]} of layer {k[1]} must leave at least one of "
                                    f"its {gs.size} groups.")
        self.sets = build_sets(model, self.group_sets)
        self.quotas = {k: int(quotas[k]) for k in self.group_sets}
        self.warmup, self.periods, self.period_steps = int(warmup), int(periods), int(period_steps)
        self.variant, self.epsilon = variant, float(epsilon)
        self.saliency = check_weights(DEFAULT_WEIGHTS if saliency is None else saliency)
        self.k = 0  # LHSPG steps taken
        self.pruned: dict[tuple[str, int], list[int]] = {k: [] for k in self.sets}  # zero for good
        self.active: dict[tuple[str, int], list[int]] = {k: [] for k in self.sets}  # this period's selection
        self.lam: dict[tuple[str, int], torch.Tensor] = {}
        self.history: list[dict] = []
        self.scales = None  # decay variant: forward scales on the selected groups' output rows
        if variant == "decay":
            self._init_scales()

    # -- schedule ----------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.warmup + self.periods * self.period_steps

    def position(self, k: int) -> tuple[int, int] | None:
        """(period, step within it from 1) of LHSPG step `k` (from 1), or None during warm-up/after."""
        t = k - self.warmup - 1
        if t < 0 or t >= self.periods * self.period_steps:
            return None
        return t // self.period_steps, t % self.period_steps + 1

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure=None):
        loss = super().step(closure)
        self.k += 1
        with torch.no_grad():
            pos = self.position(self.k)
            if pos is not None:
                period, t = pos
                if t == 1:
                    self._select(period)
                if self.variant == "paper":
                    self._project(period, t)
                else:
                    self._decay(t)
                if t == self.period_steps:
                    self._end_period(period)
            self._keep_pruned()
        return loss

    def _select(self, period: int) -> None:
        """Each set's lowest-saliency groups not yet pruned, as many as its quota for `period`."""
        from ..importance.lora_saliency import lora_saliency

        scores = lora_saliency(self.model, self.group_sets, self.saliency)
        for key, s in self.sets.items():
            want = period_quotas(self.quotas[key], self.periods)[period]
            sc = scores[key].clone()
            sc[self.pruned[key]] = math.inf
            chosen = torch.argsort(sc, stable=True)[:want].sort().values.tolist() if want else []
            self.active[key] = chosen

    def _project(self, period: int, t: int) -> None:
        lr = self.param_groups[0]["lr"]
        last = t == self.period_steps
        for key, s in self.sets.items():
            gone_before = set(self.pruned[key])
            live = [g for g in self.active[key] if g not in gone_before]
            if not live:
                continue
            j = torch.tensor(live, dtype=torch.long)
            before = [_gather(sl, j).float().clone() for sl in s.slices]
            for sl in s.slices:
                _fold(sl, j)
            norm = torch.sqrt(sum((_gather(sl, j).float() ** 2).sum(1) for sl in s.slices))
            if t == 1:  # lambda from the group's norm with its LoRA update folded in
                self.lam[key] = norm / max(lr * self.period_steps * (1.0 - self.epsilon), 1e-12)
            at = {g: i for i, g in enumerate(self.active[key])}
            lam = self.lam[key][[at[g] for g in live]]
            shrink = 1.0 - (lr * lam) / norm.clamp_min(1e-12)
            for sl in s.slices:
                _scatter_scale(sl, j, shrink)
            inner = sum((_gather(sl, j).float() * b).sum(1) for sl, b in zip(s.slices, before))
            prev2 = sum((b * b).sum(1) for b in before)
            hit = inner < self.epsilon * prev2
            out = hit | torch.tensor(last).expand_as(hit)
            gone = [g for g, o in zip(live, out.tolist()) if o]
            if gone:
                jj = torch.tensor(gone, dtype=torch.long)
                for sl in s.slices:
                    _zero(sl, jj)
                self.pruned[key] = sorted(self.pruned[key] + gone)
                self.history.append({"step": self.k, "period": period, "key": list(key),
                                     "projected": int(hit.sum()), "forced": int((~hit & out).sum())})

    def _end_period(self, period: int) -> None:
        if self.variant == "decay":
            for key in self.sets:
                self.pruned[key] = sorted(set(self.pruned[key]) | set(self.active[key]))
        else:
            self._merge_important()
        self.history.append({"step": self.k, "period": period, "end": True,
                             "pruned": {f"{k[0]}.{k[1]}": len(v) for k, v in self.pruned.items()}})
        self.active = {k: [] for k in self.sets}

    def _merge_important(self) -> None:
        """Merge `s B A` into the base weights of every prunable module and reset B (and its moments)."""
        done = set()
        for s in self.sets.values():
            for sl in s.slices:
                if sl.lora is None or sl.name in done:
                    continue
                done.add(sl.name)
                a, b, sc = sl.lora
                sl.weight += sc * (b.float() @ a.float()).to(sl.weight.dtype)
                b.data.zero_()
                st = self.state.get(b)
                for name in ("exp_avg", "exp_avg_sq"):
                    if st and name in st:
                        st[name].zero_()

    def _keep_pruned(self) -> None:
        if self.variant == "decay":
            return  # the forward scale of pruned rows stays 0
        for key, s in self.sets.items():
            if self.pruned[key]:
                j = torch.tensor(self.pruned[key], dtype=torch.long)
                for sl in s.slices:
                    _zero(sl, j)

    # -- decay variant: forward scales -------------------------------------------------------
    def _init_scales(self) -> None:
        from ..surgery.output_masks import StructuredMasks, owner_of

        keep = {}
        for s in self.sets.values():
            for sl in s.slices:
                if sl.dim == 0:
                    owner = owner_of(sl.name)
                    if (owner, 0) not in keep:
                        keep[(owner, 0)] = torch.ones(sl.weight.shape[0], dtype=sl.weight.dtype,
                                                      device=sl.weight.device)
        self.scales = StructuredMasks(self.model)
        self.scales.set_vectors(keep)

    def _decay(self, t: int) -> None:
        from ..surgery.output_masks import owner_of

        vecs = self.scales.masked
        factor = (self.period_steps - t) / self.period_steps
        for key, s in self.sets.items():
            if not self.active[key]:
                continue
            j = torch.tensor(self.active[key], dtype=torch.long)
            for sl in s.slices:
                if sl.dim == 0:
                    vecs[(owner_of(sl.name), 0)][sl.index[j].reshape(-1)] = factor

    def remove_scales(self) -> None:
        """Take the decay variant's forward hooks away (after physical removal they are not needed)."""
        if self.scales is not None:
            self.scales.remove()

    # -- state ---------------------------------------------------------------------------------
    def lhspg_state(self) -> dict:
        """What a resume needs beyond AdamW's state (tensors and JSON-able values)."""
        st = {"k": self.k, "variant": self.variant, "history": self.history,
              "pruned": {f"{k[0]}.{k[1]}": v for k, v in self.pruned.items()},
              "active": {f"{k[0]}.{k[1]}": v for k, v in self.active.items()}}
        for k, v in self.lam.items():
            st[f"lam.{k[0]}.{k[1]}"] = v
        if self.variant == "paper":  # the base weights it wrote into
            for s in self.sets.values():
                for sl in s.slices:
                    st[f"base.{sl.name}"] = sl.weight
                    if sl.bias is not None:
                        st[f"bias.{sl.name}"] = sl.bias
        else:
            for (owner, _), v in self.scales.masked.items():
                st[f"scale.{owner}"] = v
        return st

    @torch.no_grad()
    def load_lhspg_state(self, st: dict) -> None:
        """Restore `lhspg_state()` (after AdamW's own state)."""
        if st["variant"] != self.variant:
            raise ShearkitError(f"The checkpoint was written by LHSPG variant '{st['variant']}', this run uses "
                                f"'{self.variant}'; use the same variant or a new run directory.")
        keys = {f"{k[0]}.{k[1]}": k for k in self.sets}
        self.k, self.history = int(st["k"]), list(st["history"])
        self.pruned = {keys[n]: list(v) for n, v in st["pruned"].items()}
        self.active = {keys[n]: list(v) for n, v in st["active"].items()}
        self.lam = {keys[n[len("lam."):]]: v.clone() for n, v in st.items() if n.startswith("lam.")}
        if self.variant == "paper":
            for s in self.sets.values():
                for sl in s.slices:
                    sl.weight.copy_(st[f"base.{sl.name}"])
                    if sl.bias is not None:
                        sl.bias.copy_(st[f"bias.{sl.name}"])
        else:
            for (owner, _), v in self.scales.masked.items():
                v.copy_(st[f"scale.{owner}"])
