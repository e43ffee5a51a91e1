"""FlexiGPT's base selection: which kept block a pruned block should share its weights with.

For a weight matrix W, Ŵ is its rank-r truncated SVD. Pruned block i and candidate base j are
compared, matrix by matrix, by the energy of Ŵ_i - Ŵ_j that a rank-r adapter could not absorb:
d = || Ŵ_i - (Ŵ_j + Δ) ||_F with Δ the rank-r truncation of Ŵ_i - Ŵ_j, i.e.
sqrt(sum over k > r of σ_k(Ŵ_i - Ŵ_j)^2) (FlexiGPT, arXiv 2501.14713, §3, step 2). The difference
has rank <= 2r, so it is never formed: with Ŵ = (U_r S_r) V_r^T kept per matrix, the stacked
factors [U_i S_i, -U_j S_j] and [V_i, V_j] are QR-decomposed and the SVD is taken of the small
core R_L R_R^T, whose singular values are those of the difference. A block's distance is the
sum over its projections [recon: the paper does not say how the matrices are combined]. The
ablation without the low-rank step compares the full weights, sum of ||W_i - W_j||_F.

`truncated_svd` is also FlexiGPT's adapter initialisation: B = U_r S_r, A = V_r^T of the full
difference W_i - W_j make W_j + B A the best rank-r correction (Eckart-Young).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..errors import ShearkitError

SELECTIONS = ("lowrank", "plain")  # the paper's metric; the ablation on the full weights


def truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of `w` (out, in) in float32: their product is w's best rank-`rank` approximation."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def lowrank_distance(fi: tuple[torch.Tensor, torch.Tensor], fj: tuple[torch.Tensor, torch.Tensor],
                     rank: int) -> float:
    """sqrt(sum_{k>rank} σ_k^2(Ŵ_i - Ŵ_j)) from the factors `truncated_svd` returns (QR form)."""
    (li, ai), (lj, aj) = fi, fj
    _, rl = torch.linalg.qr(torch.cat([li, -lj], dim=1))  # left factor (out, 2r)
    _, rr = torch.linalg.qr(torch.cat([ai, aj], dim=0).T)  # right factor (in, 2r)
    s = torch.linalg.svdvals(rl @ rr.T)
    return float(s[rank:].double().square().sum().sqrt())


def projection_paths(model: nn.Module, i: int) -> list[str]:
    """Block-relative paths of block i's projections (q, k, v, o, MLP inputs, MLP output)."""
    view = get_adapter(unwrap(model)).block_view(i)
    return [p.name[len(view.name) + 1:] for p in view.projections()]


def block_weights(model: nn.Module, i: int) -> dict[str, torch.Tensor]:
    """Block i's projection weights as (out, in), by block-relative path."""
    view = get_adapter(unwrap(model)).block_view(i)
    return {p.name[len(view.name) + 1:]: p.weight for p in view.projections()}


def max_rank(model: nn.Module) -> tuple[int, str]:
    """The smallest rank any block projection can have, min(out, in), and which projection it is."""
    best = None
    for i in range(get_adapter(unwrap(model)).num_layers):
        for path, w in block_weights(model, i).items():
            r = min(w.shape)
            if best is None or r < best[0]:
                best = (r, f"{path} ({w.shape[0]}x{w.shape[1]})")
    return best


def block_shapes(model: nn.Module, i: int) -> dict[str, tuple[int, int]]:
    """Block i's projection shapes (out, in) by block-relative path."""
    return {k: tuple(w.shape) for k, w in block_weights(model, i).items()}


def choose_bases(model: nn.Module, pruned: Sequence[int], rank: int, select: str = "lowrank"
                 ) -> tuple[dict[int, int], dict[int, dict[int, float]]]:
    """For each pruned block, the kept block of the same shapes at the smallest distance (ties:
    the nearer in depth, then the earlier), and every distance computed: ({i: base}, {i: {j: distance}})."""
    if select not in SELECTIONS:
        raise ShearkitError(f"prune.select must be one of {', '.join(SELECTIONS)}, got '{select}'.")
    n = get_adapter(unwrap(model)).num_layers
    gone = sorted(set(pruned))
    kept = [j for j in range(n) if j not in gone]
    if not gone or not kept:
        raise ShearkitError(f"Base selection needs pruned and kept blocks; got pruned {gone} of {n}: "
                            "name at least one block to replace and leave at least one kept.")
    shapes = {b: block_shapes(model, b) for b in range(n)}
    candidates = {i: [j for j in kept if shapes[j] == shapes[i]] for i in gone}
    lonely = [i for i, c in candidates.items() if not c]
    if lonely:
        raise ShearkitError(f"Blocks {lonely} have projection widths no kept block has (per-layer widths), so no "
                            "kept block can lend them its weights; prune widths uniformly, or choose other blocks.")
    with torch.no_grad():
        if select == "lowrank":
            factors = {b: {k: truncated_svd(w, rank) for k, w in block_weights(model, b).items()}
                       for b in sorted({*gone, *(j for c in candidates.values() for j in c)})}

            def dist(i: int, j: int) -> float:
                return sum(lowrank_distance(factors[i][k], factors[j][k], rank) for k in factors[i])
        else:
            def dist(i: int, j: int) -> float:
                wi, wj = block_weights(model, i), block_weights(model, j)
                return sum(float(torch.linalg.matrix_norm(wi[k].float() - wj[k].float()).double()) for k in wi)

        distances = {i: {j: dist(i, j) for j in candidates[i]} for i in gone}
    bases = {i: min(d, key=lambda j: (d[j], abs(i - j), j)) for i, d in distances.items()}
    return bases, distances
