"""What every pruning method is built on: its config, its class, and the context it runs in.

A method is a `PruneMethod` subclass with a `PruneConfig` subclass; `shearkit.prune` builds a
`MethodContext` (tokenizer, calibration windows, data folder, run directory, resume flag, seed)
and calls `run(model, ctx) -> Plan`. A method that trains while it prunes asks the context for a
`Trainer` (`ctx.trainer(...)`) and for folders to keep its state in (`ctx.work_dir(...)`).
This module imports neither torch nor the registry, so `shearkit list` stays fast.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..errors import ShearkitError

if TYPE_CHECKING:
    import torch

    from ..plan import Plan
    from ..recovery.loop import Callback, Trainer


@dataclass
class PruneConfig:
    """Fields every method has. `ratio`: for structured methods the fraction of the decoder
    blocks' parameters removed; for unstructured ones the sparsity of the blocks' linear weights;
    for block methods the fraction of the blocks taken, round(ratio x blocks)."""

    method: str = ""
    ratio: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ShearkitError(f"prune.ratio must be in [0, 1), got {self.ratio}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MethodContext:
    """What a method may use besides the model: data, a trainer factory and a place to write."""

    tokenizer: Any
    calib: torch.Tensor | None = None  # (n, seqlen) calibration windows, when the method needs them
    data_dir: str | None = None
    run_dir: Path | None = None  # the run directory, for the method's checkpoints (None: it writes nothing)
    resume: bool = False  # continue the method from its checkpoints
    seed: int = 0

    def work_dir(self, name: str) -> Path | None:
        """`run_dir/name`, created (a method's checkpoints and logs); None without a run directory."""
        if not name or Path(name).name != name or name in (".", ".."):
            raise ShearkitError(f"A method's work folder must be a plain folder name, got '{name}'.")
        if self.run_dir is None:
            return None
        path = Path(self.run_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def trainer(self, model, config, *, callbacks: Sequence[Callback] = (), optimizer: Any = "adamw",
                name: str = "train", desc: str | None = None) -> Trainer:
        """A `Trainer` over the training data `config` (a RecoverConfig) names, writing to `work_dir(name)`.

        The caller runs it with `fit(resume=ctx.resume)`; `model` is a peft model with its adapters, or a
        plain model whose trainable parameters alone require grad (FlexiGPT's shared-block adapters).
        """
        from ..recovery.data import build_train_data
        from ..recovery.loop import Trainer

        data_dir = self.data_dir or config.data_dir
        train = build_train_data(self.tokenizer, config.data, mode=config.mode, seqlen=config.seqlen,
                                 split=config.split, data_dir=data_dir)
        return Trainer(model, self.tokenizer, train, config, callbacks=callbacks, optimizer=optimizer,
                       root=self.work_dir(name), data_dir=data_dir, desc=desc or name)


class PruneMethod:
    """Base class of a method: declares what it needs; `run` returns a Plan.

    `kind` and the description come from the method's line in `methods._MODULES`; a method
    registered by decorator alone (not listed there) declares `kind` and `families` here.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # structured | unstructured | blocks
    families: ClassVar[tuple[str, ...]] = ()
    config_cls: ClassVar[type] = PruneConfig
    needs_calibration: ClassVar[bool] = True
    needs_grad: ClassVar[bool] = False
    in_place: ClassVar[bool] = False  # run() prunes the model itself (else shearkit.prune applies the plan)
    lazy_ok: ClassVar[bool] = False  # runs on a model whose blocks stay on disk (`io.lazy`): one block at a time
    # options for a quick run on a tiny model (the method x family test matrix uses them; a method
    # that trains states a budget of a few steps here, and `data_dir` when it reads training data)
    smoke_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: PruneConfig):
        self.config = config

    def run(self, model, ctx: MethodContext) -> Plan:  # pragma: no cover - abstract
        """Decide (and, for in-place methods, apply) the pruning of `model`; return its plan."""
        raise NotImplementedError
