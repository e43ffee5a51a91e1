"""LoRAShear's saliency of a group from its base weights `W_g` and its LoRA product `(B A)_g`.

LHSPG picks, at the start of each pruning period, the least salient groups to drive to zero. The
released code scores a group by a weighted mix of proxies computed from the frozen rows/columns
`W_g` and the matching slice of `B A` (no LoRA scaling), `B A` standing in for the accumulated
negative gradient (so no weight gradient is ever formed):

    magnitude      ||W_g||
    avg_magnitude  ||W_g|| / (entries of W_g)
    cosine         <W_g, (BA)_g> / (||W_g|| ||(BA)_g||) + 1
    taylor_first   |<W_g, (BA)_g>|
    taylor_second  0.5 * taylor_first ** 2

Each proxy is divided by its L2 norm over every scored group before the weighted sum, so the
weights say how much each proxy counts, whatever its scale. Right after LoRA is attached B = 0 and
every proxy but the magnitudes is 0 (or the cosine's constant 1): warm the factors up first.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..arch.modules import unwrap, weight_view
from ..errors import ShearkitError
from ..graph.groups import GroupSet

PROXIES = ("magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second")
DEFAULT_WEIGHTS = {p: 0.2 for p in PROXIES}  # equal weights, as the authors' successor optimizer defaults to
EPS = 1e-12


def check_weights(weights: dict[str, float]) -> dict[str, float]:
    """The proxy weights, refused when a name is unknown, a weight negative or all are zero."""
    bad = sorted(set(weights) - set(PROXIES))
    if bad:
        raise ShearkitError(f"Unknown saliency proxy '{bad[0]}'; choose from {', '.join(PROXIES)}.")
    if any(float(w) < 0 for w in weights.values()) or not any(float(w) > 0 for w in weights.values()):
        raise ShearkitError(f"Saliency weights must be >= 0 with at least one > 0, got {weights}.")
    return {k: float(v) for k, v in weights.items()}


def _factors(model: nn.Module, base_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of the LoRA layer wrapping `base_name` (`...proj.base_layer`), or None without LoRA."""
    from .lora_grad import lora_of

    ab = lora_of(model, base_name)
    return None if ab is None else (ab[0], ab[1])


def group_moments(model: nn.Module, sets: dict[tuple[str, int], GroupSet]) -> dict[tuple[str, int], torch.Tensor]:
    """Per group set, a (groups, 4) float64 table: ||W_g||^2, <W_g, (BA)_g>, ||(BA)_g||^2, entries of W_g."""
    m = unwrap(model)
    out = {k: torch.zeros(gs.size, 4, dtype=torch.float64) for k, gs in sets.items()}
    by_module: dict[str, list] = defaultdict(list)
    for key, gs in sets.items():
        for part in gs.base_parts():
            by_module[part.module].append((key, part))
    with torch.no_grad():
        for name, parts in by_module.items():
            mod = m.get_submodule(name)
            w = weight_view(mod).float()
            ab = _factors(m, name)
            ba = (ab[1].float() @ ab[0].float()) if ab is not None else None
            bias = getattr(mod, "bias", None)
            for key, part in parts:
                idx = part.index.to(w.device)
                n, k = idx.shape
                if part.dim == 0:
                    wg = w[idx.reshape(-1)].reshape(n, -1)
                    bg = ba[idx.reshape(-1)].reshape(n, -1) if ba is not None else None
                    if isinstance(bias, torch.Tensor):  # a row's bias belongs to its group (LoRA adds none)
                        b = bias.detach().float()[idx]
                        wg = torch.cat([wg, b], 1)
                        bg = torch.cat([bg, torch.zeros_like(b)], 1) if bg is not None else None
                else:
                    wg = w[:, idx.reshape(-1)].T.reshape(n, -1)
                    bg = ba[:, idx.reshape(-1)].T.reshape(n, -1) if ba is not None else None
                t = out[key]
                t[:, 0] += (wg * wg).sum(1).double().cpu()
                t[:, 3] += wg.shape[1]
                if bg is not None:
                    t[:, 1] += (wg * bg).sum(1).double().cpu()
                    t[:, 2] += (bg * bg).sum(1).double().cpu()
    return out


def proxies(moments: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every proxy of the groups of one table from `group_moments`."""
    w2, inner, ba2, n = moments.unbind(1)
    wn, ban = w2.sqrt(), ba2.sqrt()
    first = inner.abs()
    cos = torch.where((wn > EPS) & (ban > EPS), inner / (wn * ban).clamp_min(EPS), torch.zeros_like(inner)) + 1.0
    return {"magnitude": wn, "avg_magnitude": wn / n.clamp_min(1), "cosine": cos, "taylor_first": first,
            "taylor_second": 0.5 * first * first}


def lora_saliency(model: nn.Module, sets: dict[tuple[str, int], GroupSet],
                  weights: dict[str, float] | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """The weighted, normalised saliency of every group (higher: more salient), keyed as `sets`."""
    weights = check_weights(DEFAULT_WEIGHTS if weights is None else weights)
    per = {k: proxies(t) for k, t in group_moments(model, sets).items()}
    out = {k: torch.zeros(gs.size, dtype=torch.float64) for k, gs in sets.items()}
    for name, w in weights.items():
        if w == 0:
            continue
        norm = torch.cat([p[name] for p in per.values()]).norm() if per else torch.tensor(0.0)
        for k, p in per.items():
            out[k] += w * p[name] / max(float(norm), EPS)
    return {k: v.float() for k, v in out.items()}
