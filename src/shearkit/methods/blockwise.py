"""The shared lifecycle of the unstructured (and N:M) methods: magnitude, Wanda, SparseGPT, BESA.

Lifecycle of `BlockwiseSparsifier.run`:

1. Describe the base model (name, weight fingerprint) before anything changes.
2. Without calibration (magnitude): visit every block and call `prune_block`.
   With calibration: capture the first block's inputs (`calibration.capture_inputs`) and walk
   the blocks (`calibration.walk_blocks`): each block is moved to the compute device, its
   layers' input statistics are gathered (`stats_kind`), `prune_block` zeroes (and may update)
   its weights, and the pruned block's outputs become the next block's inputs.
3. Return an unstructured `Plan` with each layer's exact sparsity and the pattern, and the
   keep-masks, bit-packed, as its declared `masks` (saved beside plan.json).

A method subclass sets `stats_kind` ("norm", "hessian" or None) and implements
`prune_layer(ref, stats)` (or overrides `prune_block` for whole-block methods such as BESA).
Its kind (`unstructured`) is declared on its line in `methods._MODULES`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..arch import get_adapter
from ..arch.base import BlockView
from ..calibration.blockwise import BlockInputs, capture_inputs, resolve_compute_device, walk_blocks
from ..calibration.stats import InputStats, collect_input_stats
from ..errors import ShearkitError
from ..plan import Plan
from ..progress import progress
from ..sparsity.apply import PackedMasks
from ..sparsity.layers import LinearRef, block_linears
from ..sparsity.masks import parse_nm
from .base import MethodContext, PruneConfig, PruneMethod

log = logging.getLogger(__name__)


@dataclass
class SparsityConfig(PruneConfig):
    """Options shared by the unstructured methods.

    `ratio` is the sparsity of the decoder blocks' linear weights (alias `sparsity`).
    `nm`: an N:M pattern such as "2:4" (N zeros in every M consecutive inputs; then `ratio`
    is N/M). `batch_size`: calibration windows per forward. `device`: where blocks are
    computed; None = where the model is; "cuda" with the model on CPU streams one block at a
    time through the GPU (how a model larger than GPU memory is pruned).
    `offload_activations`: keep calibration activations on the CPU too, moving one batch at a
    time to the device (for calibration sets larger than the device's spare memory).
    """

    ratio: float = 0.5
    nm: str | None = None
    batch_size: int = 1
    device: str | None = None
    offload_activations: bool = False

    def __post_init__(self):
        super().__post_init__()
        pattern = parse_nm(self.nm)
        if pattern:
            self.ratio = pattern[0] / pattern[1]
        if self.batch_size < 1:
            raise ShearkitError(f"prune.batch_size must be >= 1, got {self.batch_size}.")

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)


class BlockwiseSparsifier(PruneMethod):
    """Base of the in-place unstructured methods (see the module docstring for the lifecycle)."""

    in_place: ClassVar[bool] = True
    config_cls: ClassVar[type] = SparsityConfig
    stats_kind: ClassVar[str | None] = "norm"  # "norm" | "hessian" | None
    updates_weights: ClassVar[bool] = False  # True when kept weights change too (SparseGPT)

    def prune_layer(self, ref: LinearRef, stats: InputStats | None) -> torch.Tensor:
        """Sparsify one (out, in) weight in place and return its keep-mask."""
        raise NotImplementedError  # pragma: no cover

    def prune_block(self, view: BlockView, inputs: BlockInputs | None) -> dict[str, torch.Tensor]:
        """Sparsify every linear layer of a block; returns keep-masks by name inside the block."""
        refs = block_linears(view)
        stats: dict[str, InputStats] = {}
        if self.stats_kind and inputs is not None:
            mods = {r.name: r.module for r in refs.values()}
            stats = collect_input_stats(view.module, mods, inputs, hessian=self.stats_kind == "hessian")
        return {rel: self.prune_layer(ref, stats.get(ref.name)) for rel, ref in refs.items()}

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self, model, ctx: MethodContext) -> Plan:
        cfg = self.config
        calib = ctx.calib
        t0 = time.perf_counter()
        base = Plan.describe_base(model)
        self.base_info = base
        self.extra: dict[str, Any] = {}
        records: dict[str, dict[str, Any]] = {}
        masks = PackedMasks()
        zeros = total = 0

        def record(view: BlockView, keeps: dict[str, torch.Tensor]) -> None:
            nonlocal zeros, total
            sp = {}
            names = {rel: ref.name for rel, ref in block_linears(view).items()}
            for rel, keep in keeps.items():
                masks.add(names[rel], keep)
                z = int((~keep).sum())
                sp[rel] = z / keep.numel()
                zeros += z
                total += keep.numel()
            records[str(view.index)] = {"sparsity": sp, "pattern": cfg.nm or "unstructured"}
            log.info("%s: block %d pruned (%.1f s so far)", self.name, view.index, time.perf_counter() - t0)

        training = model.training
        model.eval()  # dropout off: calibration statistics must be deterministic
        try:
            if self.needs_calibration:
                if calib is None:
                    raise ShearkitError(f"Method '{self.name}' needs calibration tokens.")
                inputs = capture_inputs(model, calib, batch_size=cfg.batch_size, device=cfg.device,
                                        offload_activations=cfg.offload_activations,
                                        desc=f"{self.name} calibration")
                self.walk(model, inputs, lambda v, x: record(v, self.prune_block(v, x)))
            else:
                dev = resolve_compute_device(model, cfg.device)
                for view in progress(get_adapter(model).blocks(), f"{self.name} blocks", unit="block"):
                    home = next(view.module.parameters()).device
                    view.module.to(dev)
                    record(view, self.prune_block(view, None))
                    view.module.to(home)
        finally:
            model.train(training)
        plan = Plan(method=self.name, kind="unstructured", ratio_target=cfg.ratio,
                    ratio_achieved=zeros / max(total, 1), base=base, config=cfg.to_dict(), layers=records,
                    extra={"pattern": cfg.nm or "unstructured", "weights_updated": self.updates_weights,
                           "linear_params": total, "wall_s": round(time.perf_counter() - t0, 3), **self.extra},
                    masks=masks)
        return plan

    def walk(self, model, inputs: BlockInputs, fn) -> None:
        """Walk all blocks with `fn`; BESA overrides this to checkpoint and resume."""
        walk_blocks(model, inputs, fn, desc=f"{self.name} blocks")
