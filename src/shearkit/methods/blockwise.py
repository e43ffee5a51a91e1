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

Checkpoints (every method, one mechanism): with a run directory, every `save_every` blocks the
finished blocks' keep-masks (and, for methods that update kept weights, their weights) go to
`<run>/<method>/block-NNNN*.safetensors` and `state.json` lists them with the method's records
(`self.extra`) and the identity of the run (base fingerprint, calibration digest, settings).
A resumed run re-applies the finished blocks instead of pruning them again, still running them
forward so that the next block sees the same inputs, and ends with the same weights and plan.
BESA's `resume_dir` names the folder explicitly (always resumed from).

A method subclass sets `stats_kind` ("norm", "hessian" or None) and implements
`prune_layer(ref, stats)` (or overrides `prune_block` for whole-block methods such as BESA).
Its kind (`unstructured`) is declared on its line in `methods._MODULES`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..arch import get_adapter
from ..arch.base import BlockView
from ..calibration.blockwise import (
    BlockInputs,
    capture_inputs,
    resolve_compute_device,
    walk_blocks,
)
from ..calibration.stats import InputStats, collect_input_stats
from ..errors import ShearkitError
from ..io.lazy import is_lazy, loaded_block
from ..io.stage_state import (
    load_tensors,
    read_state,
    save_tensors,
    tensor_digest,
    write_state,
)
from ..plan import Plan
from ..progress import progress
from ..sparsity.apply import PackedMasks, load_masks, save_masks
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
    `save_every`: with a run directory, checkpoint the finished blocks every this many blocks
    (0: never), so that `--resume` continues after the last checkpointed block.
    """

    ratio: float = 0.5
    nm: str | None = None
    batch_size: int = 1
    device: str | None = None
    offload_activations: bool = False
    save_every: int = 1

    def __post_init__(self):
        super().__post_init__()
        pattern = parse_nm(self.nm)
        if pattern:
            self.ratio = pattern[0] / pattern[1]
        if self.batch_size < 1:
            raise ShearkitError(f"prune.batch_size must be >= 1, got {self.batch_size}.")
        if self.save_every < 0:
            raise ShearkitError(f"prune.save_every must be >= 0 (0: no checkpoints), got {self.save_every}.")

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)


class BlockwiseSparsifier(PruneMethod):
    """Base of the in-place unstructured methods (see the module docstring for the lifecycle)."""

    in_place: ClassVar[bool] = True
    lazy_ok: ClassVar[bool] = True
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
        records: dict[str, dict[str, Any]] = {}
        masks = PackedMasks()
        zeros = total = 0
        if self.needs_calibration and calib is None:
            raise ShearkitError(f"Method '{self.name}' needs calibration tokens: give the MethodContext calibration "
                                "windows (calib=), or run it with shearkit.prune, which draws them.")
        root, resume = self.checkpoint_root(ctx)
        identity = self.checkpoint_identity(base, calib if self.needs_calibration else None)
        state = read_state(root, identity, resume=resume, what=f"{self.name} blockwise loop")
        done = set(state.get("done", [])) if state else set()
        self.extra: dict[str, Any] = dict(state.get("extra") or {}) if state else {}
        if done:
            log.info("%s: resuming after %d checkpointed blocks from %s", self.name, len(done), root)
        pending: list[int] = []
        num_blocks = get_adapter(model).num_layers
        lazy = is_lazy(model)

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

        def visit(view: BlockView, inputs: BlockInputs | None) -> None:
            if view.index in done:  # finished before an interruption: re-apply it
                keeps = self.restore_block(root, view)
            else:
                keeps = self.prune_block(view, inputs)
                pending.append(view.index)
            record(view, keeps)
            last = view.index == num_blocks - 1
            every = 1 if lazy else cfg.save_every  # a lazy model holds only this block in memory
            if root is not None and cfg.save_every and pending and (len(pending) >= every or last):
                self.save_blocks(root, model, pending, masks, done, identity)

        training = model.training
        model.eval()  # dropout off: calibration statistics must be deterministic
        try:
            if self.needs_calibration:
                inputs = capture_inputs(model, calib, batch_size=cfg.batch_size, device=cfg.device,
                                        offload_activations=cfg.offload_activations,
                                        desc=f"{self.name} calibration")
                self.walk(model, inputs, visit)
            else:
                dev = resolve_compute_device(model, cfg.device)
                for view in progress(get_adapter(model).blocks(), f"{self.name} blocks", unit="block"):
                    with loaded_block(model, view.module, dev, write=True):
                        visit(view, None)
        finally:
            model.train(training)
        plan = Plan(method=self.name, kind="unstructured", ratio_target=cfg.ratio,
                    ratio_achieved=zeros / max(total, 1), base=base, config=cfg.to_dict(), layers=records,
                    extra={"pattern": cfg.nm or "unstructured", "weights_updated": self.updates_weights,
                           "linear_params": total, "wall_s": round(time.perf_counter() - t0, 3), **self.extra},
                    masks=masks)
        return plan

    def walk(self, model, inputs: BlockInputs, fn) -> None:
        """Walk all blocks with `fn` (which prunes, or re-applies, and checkpoints each block)."""
        walk_blocks(model, inputs, fn, desc=f"{self.name} blocks")

    # -- checkpoint / resume (the same for every blockwise method) ----------------------------
    def checkpoint_root(self, ctx: MethodContext) -> tuple[Path | None, bool]:
        """The checkpoint folder and whether to resume from it: `<run>/<method>` with the run's
        `--resume`, or an explicit `resume_dir` (BESA's option), always resumed from."""
        explicit = getattr(self.config, "resume_dir", None)
        if explicit:
            return Path(explicit), True
        if ctx.run_dir is None:
            return None, False
        return Path(ctx.run_dir) / self.name, ctx.resume

    def checkpoint_identity(self, base: dict, calib: torch.Tensor | None) -> dict:
        """What a checkpoint must match to be resumed from: the base weights, the calibration tokens
        and every setting that changes the result (not where it runs nor how often it checkpoints)."""
        skip = ("resume_dir", "device", "offload_activations", "save_every")
        return {"method": self.name, "fingerprint": base["fingerprint"],
                "calib": None if calib is None else tensor_digest(calib),
                "config": {k: v for k, v in self.config.to_dict().items() if k not in skip}}

    @staticmethod
    def _block_file(root: Path, index: int, suffix: str = "") -> Path:
        return Path(root) / f"block-{index:04d}{suffix}.safetensors"

    def save_blocks(self, root: Path, model, pending: list[int], masks: PackedMasks, done: set[int],
                    identity: dict) -> None:
        """Write the masks (and updated weights) of the `pending` blocks, then `state.json` listing
        them as done; `pending` is emptied."""
        ad = get_adapter(model)
        for i in pending:
            refs = block_linears(ad.block_view(i))
            save_masks({ref.name: masks[ref.name] for ref in refs.values()}, self._block_file(root, i))
            if self.updates_weights:
                save_tensors(self._block_file(root, i, ".weights"), {ref.name: ref.module.weight for ref in refs.values()})
        done.update(pending)
        pending.clear()
        write_state(root, identity, {"done": sorted(done), "extra": self.extra})

    @torch.no_grad()
    def restore_block(self, root: Path, view: BlockView) -> dict[str, torch.Tensor]:
        """Re-apply a checkpointed block (its masks, or its saved weights) and return its keep-masks."""
        refs = block_linears(view)
        saved = load_masks(self._block_file(root, view.index))
        keeps = {rel: saved[ref.name].to(ref.weight.device) for rel, ref in refs.items()}
        if self.updates_weights:
            weights = load_tensors(self._block_file(root, view.index, ".weights"), f"{self.name} block")
            for ref in refs.values():
                ref.module.weight.copy_(weights[ref.name])
        else:
            for rel, ref in refs.items():
                ref.apply_mask(keeps[rel])
        return keeps
