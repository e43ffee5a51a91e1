"""Plot of a plan's per-layer sparsity (BESA's learned allocation, or any unstructured plan)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ShearkitError


def layer_sparsity_table(plan) -> dict[str, list[float]]:
    """Module name inside the block -> sparsity per layer index (in layer order)."""
    if plan.kind != "unstructured":
        raise ShearkitError(f"Per-layer sparsity exists for unstructured plans only; this plan is '{plan.kind}'.")
    table: dict[str, list[float]] = {}
    for li in sorted(plan.layers, key=int):
        for rel, s in plan.layers[li].get("sparsity", {}).items():
            table.setdefault(rel, []).append(float(s))
    return table


def plot_layer_sparsity(plan, path: str | os.PathLike) -> Path:
    """Draw each module's sparsity against the layer index, with the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = layer_sparsity_table(plan)
    fig, ax = plt.subplots(figsize=(8, 4))
    for rel, values in table.items():
        ax.plot(range(len(values)), values, marker="o", ms=3, label=rel.split(".")[-1])
    ax.axhline(plan.ratio_target, ls="--", color="grey", lw=1, label=f"target {plan.ratio_target:.2f}")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_title(f"{plan.method}: per-layer sparsity (achieved {plan.ratio_achieved:.4f})")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    from ..io.atomic import atomic_file

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
