"""Model extension (FlexiGPT section 3.5): grow a model with weight-shared copies of its blocks, then
train the copies' adapters and output-norm scales.

`shearkit.extend(model, tokenizer, add_blocks=K, pattern="block", start=i, end=j)` inserts K copies
(`surgery.extend`: `block` repeats each block of i..j in place, `sequential` repeats the span after
itself) and trains only what the copies own (their rank-r adapters, LoRA-initialised with B = 0,
and their output norms' scales; the shared weights and the input norms stay frozen) with the
shared `Trainer` on pretraining-style text. `Extender` is the method-like runner that does it in a
`MethodContext`; the CLI (`shearkit extend`) and the API both use it. The recipe section is
`extend` (`recipes/extend.yaml`):
```yaml
extend: {add_blocks: 6, pattern: block, start: 12, end: 17, rank: 32,
         train: {steps: 128, data: c4, seqlen: 256, batch_size: 4, lr: 1.0e-3}}
```
Reconstructions (the paper leaves them open): the adapters' rank (hidden / 16, as FlexiGPT's),
the output norms' initial scale (0.01; 0 starts the extended model at exactly the original), the
training budget and learning rate (FlexiGPT's defaults; the paper trains 10B tokens).
This module imports no torch, so recipes parse fast.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ShearkitError
from .recipe import build_config, register_section

SECTION = "extend"


@dataclass
class ExtendConfig:
    """add_blocks: blocks added (K); pattern: `block` or `sequential`; start / end: the span of
    repeated blocks, inclusive (default: every block); rank: the copies' adapter rank (None: hidden
    / 16 rounded down to a power of two, capped at the smallest projection's rank); output_norm /
    norm_init: the copies' output norms and their initial scale; training: train the copies after
    inserting them; train: the training run (fields of `recover`)."""

    add_blocks: int | None = None
    pattern: str = "block"
    start: int | None = None
    end: int | None = None
    rank: int | None = None
    output_norm: bool = True
    norm_init: float = 1e-2
    training: bool = True
    train: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self):
        from .surgery.extend import PATTERNS

        k = self.add_blocks
        if k is None:
            raise ShearkitError("Say how many blocks to add: --add-blocks K (extend.add_blocks).")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ShearkitError(f"extend.add_blocks must be a whole number >= 1, got {k!r}.")
        if self.pattern not in PATTERNS:
            raise ShearkitError(f"extend.pattern must be one of {', '.join(PATTERNS)}, got '{self.pattern}'.")
        for key in ("start", "end"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ShearkitError(f"extend.{key} must be a block index >= 0, got {v!r}.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ShearkitError(f"extend.rank must be a whole number >= 1 (or unset for hidden / 16), got {self.rank!r}.")
        if not self.norm_init >= 0:
            raise ShearkitError(f"extend.norm_init must be >= 0, got {self.norm_init}.")
        self.train_config(self.rank or 8)  # refuse bad training settings before any model work

    def train_config(self, rank: int):
        """The training run as a RecoverConfig."""
        from .methods.flexigpt import shared_train_config

        return shared_train_config(self.train, rank, self.seed, SECTION)

    def to_dict(self) -> dict:
        return asdict(self)


register_section(SECTION, lambda data: build_config(ExtendConfig, data, SECTION))


class Extender:
    """The method-like runner: insert the copies, then train them with the context's `Trainer`."""

    name = SECTION

    def __init__(self, config: ExtendConfig):
        self.config = config

    def run(self, model, ctx) -> dict:
        """Extend `model` in place (ctx: a `methods.MethodContext`); returns what was done."""
        import torch

        from .arch import get_adapter
        from .arch.modules import unwrap
        from .methods.flexigpt import resolve_rank
        from .recovery.loop import train_summary
        from .surgery.extend import extend_blocks
        from .surgery.shared_block import refuse_split_sharing, train_only_shared_parts

        cfg = self.config
        m = unwrap(model)
        if cfg.training:
            refuse_split_sharing()  # before the model is changed: an FSDP launch that would split shared weights
        rank = resolve_rank(m, cfg.rank, f"{SECTION}.rank")
        before = get_adapter(m).param_counts()
        n = get_adapter(m).num_layers
        torch.manual_seed(cfg.seed)  # the adapters' init: a resumed run rebuilds the same copies
        layout = extend_blocks(m, cfg.add_blocks, cfg.pattern, cfg.start, cfg.end, rank=rank,
                               output_norm=cfg.output_norm, norm_init=cfg.norm_init)
        record: dict[str, Any] = {
            "add_blocks": cfg.add_blocks, "pattern": cfg.pattern, "start": 0 if cfg.start is None else cfg.start,
            "end": n - 1 if cfg.end is None else cfg.end, "rank": rank, "blocks_before": n,
            "blocks_after": get_adapter(m).num_layers, **layout, "params_before": before}
        if cfg.training:
            if ctx.tokenizer is None:
                raise ShearkitError("Training the added blocks needs the tokenizer; pass it, or training=False.")
            with train_only_shared_parts(m):
                trainer = ctx.trainer(m, cfg.train_config(rank), name=SECTION, desc=SECTION)
                history = trainer.fit(resume=ctx.resume)
            record["train"] = train_summary(history, "resumed_from")
        record["params_after"] = get_adapter(m).param_counts()
        return record


def extend(model, tokenizer=None, config: ExtendConfig | None = None, *, data_dir: str | os.PathLike | None = None,
           run_dir: str | os.PathLike | None = None, resume: bool = False, **options: Any) -> dict:
    """Grow `model` in place by weight-shared copies of its blocks and train them (see the module doc).

    Args:
        options: fields of `ExtendConfig` (add_blocks, pattern, start, end, rank, norm_init,
            training, train), when no `config` is given.
        data_dir: folder of local data sets; run_dir: where the training keeps its log and
            checkpoints (`run_dir/extend`); resume: continue that training from its checkpoints.

    Returns:
        {sources, copies, bases, rank, parameter counts before and after, train: the training summary}.
    """
    from .methods.base import MethodContext

    if config is not None and options:
        raise ShearkitError(f"Give a config or options ({', '.join(options)}), not both.")
    cfg = config if config is not None else build_config(ExtendConfig, options, SECTION)
    if resume and run_dir is None:
        raise ShearkitError("resume=True needs run_dir, the folder that holds the training's checkpoints.")
    ctx = MethodContext(tokenizer, data_dir=None if data_dir is None else str(data_dir),
                        run_dir=None if run_dir is None else Path(run_dir), resume=resume, seed=cfg.seed)
    return Extender(cfg).run(model, ctx)


__all__ = ["ExtendConfig", "Extender", "extend"]
