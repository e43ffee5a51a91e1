"""Blockwise calibration: run calibration tokens through a model one decoder block at a time.

Sequential pruning methods (SparseGPT, Wanda, BESA) need, for each
block, the activations that block sees *after the earlier blocks were pruned*. Running the
whole model for every block would be wasteful and would need the whole model on the
accelerator. Instead:

1. `capture_inputs` runs the model's stem (embeddings, rotary tables, mask construction) on the
   calibration tokens and stops at the first decoder block, recording its hidden-state input
   and **every** positional and keyword argument of the call (attention mask, position ids,
   RoPE `position_embeddings`, cache position, ...). Newer transformers need all of them; a
   catcher that stores only the mask and position ids breaks RoPE models (BESA's released code).
2. `walk_blocks` visits the blocks in order. For each one it moves the block to the compute
   device, hands it and its cached inputs to a callback (which may prune it), then runs the
   (now pruned) block over the inputs to produce the next block's inputs, and moves the block
   back. Only one block and one set of activations live on the compute device, so a model far
   larger than the accelerator's memory can be pruned with the rest kept on CPU; a model loaded
   lazily (`io.lazy`) keeps the rest on disk, so one larger than host memory can be pruned too.

Nothing here knows which method is running: callbacks get the block view and its inputs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.base import BlockView
from ..batching import Backoff, chunks
from ..errors import ShearkitError

log = logging.getLogger(__name__)


class _Caught(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


@dataclass
class BlockInputs:
    """The calibration inputs of one block: hidden states per batch plus the call's other args.

    `hidden[b]` is a (batch, seqlen, hidden) tensor on `store` (the compute `device`, or the
    CPU when activations are offloaded); `args[b]` and `kwargs[b]` are the remaining positional
    and keyword arguments of that batch's call, as the model passed them to its first block
    (identical across blocks, since the stem computes them once), kept on `device`.
    """

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict[str, Any]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    store: torch.device | None = None  # where `hidden` lives; None = `device`
    # rows per block call: a batch that runs out of memory is run in smaller chunks (`batching`)
    backoff: Backoff | None = None

    def __post_init__(self):
        if self.backoff is None:
            self.backoff = Backoff(max((h.shape[0] for h in self.hidden), default=1), "calibration")

    def hidden_at(self, b: int) -> torch.Tensor:
        """Batch b's hidden states on the compute device."""
        return self.hidden[b].to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def call(self, block: nn.Module, b: int, hidden: torch.Tensor | None = None, rows: tuple[int, int] | None = None
             ) -> torch.Tensor:
        """Run `block` on batch `b` (or on `hidden` with batch b's other arguments); `rows=(lo, hi)`:
        on those rows of the batch only (`hidden` then holds just those rows)."""
        x = self.hidden_at(b) if hidden is None else hidden
        args, kwargs = self.args[b], self.kwargs[b]
        if rows is not None and rows != (0, self.hidden[b].shape[0]):
            n, (lo, hi) = self.hidden[b].shape[0], rows
            if hidden is None:
                x = x[lo:hi]
            args, kwargs = _rows(args, lo, hi, n), _rows(kwargs, lo, hi, n)
        return block_output(block(x, *args, **kwargs))

    @torch.no_grad()
    def forward(self, block: nn.Module, rows: int | None = None) -> list[torch.Tensor]:
        """Outputs of `block` for every batch (no gradients), stored like `hidden`.

        A batch that runs out of memory is run again in chunks of half its rows, and the chunks'
        outputs joined (each row's output is its own). `rows`: chunks of at most that many rows and
        no retrying (the caller retries: `calibration.stats.collect_input_stats`)."""
        store = self.store or self.device

        def batch(b: int) -> torch.Tensor:
            n = self.hidden[b].shape[0]

            def run(lo: int, hi: int) -> torch.Tensor:  # only these rows go to the device (offloaded inputs)
                x = self.hidden_at(b) if (lo, hi) == (0, n) else self.hidden[b][lo:hi].to(self.device, non_blocking=True)
                return self.call(block, b, x, rows=(lo, hi)).to(store)

            parts = [run(lo, hi) for lo, hi in chunks(n, rows)] if rows is not None else self.backoff.map(run, n)
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return [batch(b) for b in range(len(self))]

    def batches(self) -> Iterator[tuple[torch.Tensor, tuple, dict]]:
        for b in range(len(self)):
            yield self.hidden_at(b), self.args[b], self.kwargs[b]


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (transformers 5 returns a tensor, older
    versions a tuple whose first item is the hidden states)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ShearkitError(f"A decoder block returned {type(out).__name__}; expected a tensor or a tuple "
                        "starting with the hidden states.")


def _rows(obj: Any, lo: int, hi: int, n: int) -> Any:
    """Rows `lo..hi` of a block call's per-row arguments: the tensors (of 2 dimensions or more) whose
    first dimension is the batch's `n` rows (masks, position ids); shared ones (RoPE tables for positions
    (1, seqlen), cache positions (seqlen,)) and other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi] if obj.dim() >= 2 and obj.shape[0] == n else obj
    if isinstance(obj, tuple):
        return tuple(_rows(o, lo, hi, n) for o in obj)
    if isinstance(obj, list):
        return [_rows(o, lo, hi, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _rows(v, lo, hi, n) for k, v in obj.items()}
    return obj


class _Unjoinable(Exception):
    """The chunks of a batch captured arguments that are neither per-row nor shared."""


def _join(parts: list, rows: list[int]) -> Any:
    """One batch's call arguments from those its row chunks (of `rows` rows each) were called with:
    per-row tensors (first dimension = the chunk's rows in every chunk) are concatenated, values alike
    in every chunk kept once (the inverse of `_rows`)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(p, torch.Tensor) and p.dim() >= 2 and p.shape[0] == r and p.shape[1:] == first.shape[1:]
               for p, r in zip(parts, rows)):
            return torch.cat(parts)
    elif isinstance(first, (tuple, list)) and all(type(p) is type(first) and len(p) == len(first) for p in parts):
        return type(first)(_join([p[i] for p in parts], rows) for i in range(len(first)))
    elif isinstance(first, dict) and all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
        return {k: _join([p[k] for p in parts], rows) for k in first}
    if all(_same(first, p) for p in parts[1:]):
        return first
    raise _Unjoinable


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts to `device` (other objects unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    """Structural equality with exact tensor comparison (to share identical kwargs)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) in (int, float, bool, str, type(None)) and a == b)


def _stem_tensors(model: nn.Module, layers: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_param) for every parameter/buffer outside the decoder blocks."""
    inside = {id(m) for m in layers.modules()}
    out = []
    for m in model.modules():
        if id(m) in inside:
            continue
        out += [(m, n, True) for n, p in m._parameters.items() if p is not None]
        out += [(m, n, False) for n, b in m._buffers.items() if b is not None]
    return out


def _move_tensor(m: nn.Module, name: str, is_param: bool, device: torch.device) -> torch.device:
    t = m._parameters[name] if is_param else m._buffers[name]
    old = t.device
    if old != device:
        if is_param:
            t.data = t.data.to(device)  # keeps the Parameter object, so tied weights stay tied
        else:
            m._buffers[name] = t.to(device)
    return old


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def resolve_compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """`None` means where the model already is; 'auto' means CUDA when present."""
    if device is None:
        return model_device(model)
    from ..device import resolve_device

    return torch.device(resolve_device(str(device)))


@torch.no_grad()
def capture_inputs(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1,
                   device: str | torch.device | None = None, offload_activations: bool = False,
                   desc: str | None = None) -> BlockInputs:
    """Record the first decoder block's inputs for each batch of calibration `tokens`.

    Only the stem (everything outside the decoder blocks) is moved to `device` for this;
    the blocks stay where they are. Returns the inputs on `device`.

    Args:
        tokens: LongTensor (n, seqlen) of calibration windows.
        batch_size: windows per forward call.
        device: compute device; None = the model's device.
        offload_activations: keep the calibration activations on the CPU and move one batch
            at a time to `device` (device memory: one block plus one batch).
        desc: show a progress bar with that label.
    """
    from ..progress import progress

    if tokens.dim() != 2:
        raise ShearkitError(f"Calibration tokens must be a (samples, seqlen) tensor, got shape {tuple(tokens.shape)}.")
    if batch_size < 1:
        raise ShearkitError(f"batch_size must be >= 1, got {batch_size}.")
    dev = resolve_compute_device(model, device)
    store = torch.device("cpu") if offload_activations else dev
    ad = get_adapter(model)
    first = ad.layers[0]
    stem = _stem_tensors(model, ad.layers)
    old = [_move_tensor(m, n, p, dev) for m, n, p in stem]
    caught: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        caught["args"], caught["kwargs"] = args, kwargs
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    hidden, args_l, kwargs_l = [], [], []
    backoff = Backoff(batch_size, "calibration")

    def run_stem(ids: torch.Tensor) -> tuple[torch.Tensor, tuple, dict] | None:
        """The first block's (hidden, other args, kwargs) for `ids`; None when the block was not called."""
        try:
            model(input_ids=ids, use_cache=False)
        except _Caught:
            pass
        else:
            return None
        args = caught.pop("args")
        kwargs = {k: v for k, v in caught.pop("kwargs").items()}
        if args:
            return args[0], tuple(args[1:]), kwargs
        return kwargs.pop("hidden_states"), (), kwargs

    try:
        all_ids = tokens.to(dev)  # one copy to the device, not one per batch
        starts = range(0, tokens.shape[0], batch_size)
        for s in progress(starts, desc, unit="batch"):
            ids = all_ids[s:s + batch_size]
            # a batch that runs out of memory runs in row chunks, joined back into this one batch
            parts = backoff.map(lambda lo, hi: run_stem(ids[lo:hi]), ids.shape[0])
            if any(p is None for p in parts):  # the model's forward skipped its blocks (num_hidden_layers 0)
                raise ShearkitError(
                    "The first decoder block was never called during calibration: the model's forward skipped it "
                    f"(config.num_hidden_layers is {getattr(model.config, 'num_hidden_layers', '?')}; the model "
                    f"holds {len(ad.layers)} blocks). Make config.num_hidden_layers match the blocks the model holds.")
            if len(parts) == 1:
                x, rest, kwargs = parts[0]
            else:
                try:
                    x, rest, kwargs = _join(parts, [p[0].shape[0] for p in parts])
                except _Unjoinable:
                    raise ShearkitError(
                        f"A calibration batch of {ids.shape[0]} windows ran out of memory, and it cannot be run in "
                        "smaller parts: the model's first decoder block takes arguments that are neither one per "
                        "window nor shared by all windows. Lower the calibration batch size (prune.batch_size) or "
                        "calib.seqlen.") from None
            # share identical per-batch arguments (masks, RoPE tables) instead of storing copies
            if args_l and _same(rest, args_l[0]) and _same(kwargs, kwargs_l[0]):
                rest, kwargs = args_l[0], kwargs_l[0]
            hidden.append(x.detach().to(store))
            args_l.append(rest)
            kwargs_l.append(kwargs)
    finally:
        handle.remove()
        for (m, n, p), d in zip(stem, old):
            _move_tensor(m, n, p, d)
    backoff.what = "calibration blocks"
    return BlockInputs(hidden, args_l, kwargs_l, dev, store, backoff)


BlockFn = Callable[[BlockView, BlockInputs], Any]


def walk_blocks(model: nn.Module, inputs: BlockInputs, fn: BlockFn | None = None, *, start: int = 0,
                stop: int | None = None, propagate: bool = True,
                after: Callable[[BlockView, BlockInputs], Any] | None = None,
                desc: str | None = None, changes: bool | None = None) -> BlockInputs:
    """Visit decoder blocks `start..stop-1` in order, feeding each its predecessor's output.

    For block i: bring it to `inputs.device` (`io.lazy.loaded_block`: moved there, or loaded from disk
    for a lazy model), call `fn(view, inputs)` (which may change the block's weights), then (with
    `propagate`) replace `inputs.hidden` by the block's outputs on those inputs, call
    `after(view, outputs)` (e.g. to checkpoint) and put the block back where it was. `changes`: whether
    `fn` changes the block (default: when there is an `fn`), so that a lazy model keeps the changes.
    `inputs` is updated in place and returned (the last block's outputs).
    Blocks before `start` must already have been visited (the caller passes their output).
    `desc` shows a progress bar with that label.
    """
    from ..io.lazy import loaded_block
    from ..progress import progress

    ad = get_adapter(model)
    stop = ad.num_layers if stop is None else stop
    write = fn is not None if changes is None else changes
    for i in progress(range(start, stop), desc, unit="block"):
        view = ad.block_view(i)
        with loaded_block(model, view.module, inputs.device, write=write):
            if fn is not None:
                fn(view, inputs)
            if propagate:
                inputs.hidden = inputs.forward(view.module)
            if after is not None:
                after(view, inputs)
        log.debug("block %d done", i)
    return inputs


@torch.no_grad()
def final_hidden(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1,
                 device: str | torch.device | None = None) -> list[torch.Tensor]:
    """Last decoder block's outputs computed blockwise (used to test the runner against a
    whole-model forward, and by block-scoring methods)."""
    inputs = capture_inputs(model, tokens, batch_size=batch_size, device=device)
    return walk_blocks(model, inputs).hidden
