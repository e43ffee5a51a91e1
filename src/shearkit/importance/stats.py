"""Calibration statistics, collected once and reused by every importance function.

One pass over the calibration tokens accumulates, for every linear layer of the decoder blocks:
- the gradient of the language-modelling loss w.r.t. its weight and bias (summed over batches,
  as LLM-Pruner does), when `grads=True`: the weights' own `.grad` is the one accumulator (in the
  weights' dtype), handed over to the statistics without a copy when it is float32 on the CPU;
- the sum over tokens of each input feature's square (`act_sq`, for Wanda-style `|W|·‖X‖`
  scores), recorded by forward hooks, when `act_norms=True`.

Tensors are stored per module path in the `(out, in)` orientation (Conv1D transposed), on CPU
in float32, so scores never depend on the device the pass ran on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..arch.modules import base_module, is_conv1d, unwrap
from ..batching import Backoff, chunks
from ..errors import ShearkitError


@dataclass
class Stats:
    """Per-module calibration statistics (keys: module paths of base layers)."""

    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # (out, in)
    bias_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # (in,) sum of x^2 over tokens
    n_tokens: int = 0
    loss: float = float("nan")  # mean calibration loss


def _handover(g: torch.Tensor) -> torch.Tensor:
    """A gradient as Stats keeps it (float32, CPU): the same storage when it already is, so the
    statistics never hold a second gradient-sized copy next to the accumulator."""
    return g.detach().to(device="cpu", dtype=torch.float32)


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Base linear layers (Linear or Conv1D) inside the decoder blocks, by module path."""
    from ..arch import get_adapter

    m = unwrap(model)
    out = {}
    for b in get_adapter(m).blocks():
        for name, mod in b.linear_modules().items():
            base = base_module(mod)
            out[name + (".base_layer" if base is not mod else "")] = base
    return out


def collect_stats(model: nn.Module, tokens: torch.Tensor, *, grads: bool = True, act_norms: bool = False,
                  batch_size: int = 1, desc: str | None = None, checkpointing: bool = False,
                  loss_chunk: int = 0, checkpoint: str | os.PathLike | None = None, save_every: int = 0,
                  resume: bool = False) -> Stats:
    """Run the calibration tokens through `model` once and gather the statistics asked for.

    Args:
        tokens: LongTensor (n, seqlen) of calibration windows.
        grads: accumulate loss gradients of the block weights (needs a backward pass).
        act_norms: accumulate per-input-feature squared activations.
        batch_size: windows per forward pass; a pass that runs out of memory starts again (from its
            checkpoint) with half as many windows per forward pass, each batch's loss weighted so that
            the statistics are the same sums (`batching`).
        desc: show a progress bar with that label.
        checkpointing: recompute activations in the backward pass (less memory, same statistics;
            `arch.modules.recompute_activations`).
        loss_chunk: > 0: the output head and loss run on that many tokens at a time
            (`arch.lm_head`: no full-vocabulary logits; same loss).
        checkpoint: a folder where, every `save_every` batches (and after the last), the
            accumulators (gradients, squared activations, token count, loss sum) and the number of
            batches done are written (`io.stage_state`); with `resume`, a pass finds its checkpoint there and
            continues from it to the same statistics, bit for bit. None (or save_every 0): none.
    """
    from contextlib import nullcontext

    from ..arch.lm_head import causal_lm_loss
    from ..arch.modules import recompute_activations
    from ..progress import progress

    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ShearkitError(f"Calibration tokens must be a (n, seqlen>=2) tensor, got shape {tuple(tokens.shape)}.")
    mods = block_linears(model)
    device = next(model.parameters()).device
    stats = Stats()
    tracked = {f"{n}.{k}": p for n, mod in mods.items() for k in ("weight", "bias")
               if (p := getattr(mod, k, None)) is not None}
    ckpt = _PassCheckpoint(checkpoint, model, tokens, save_every, resume,
                           {"grads": grads, "act_norms": act_norms, "batch_size": batch_size,
                            "loss_chunk": loss_chunk}) if checkpoint is not None and save_every > 0 else None
    handles = []
    if act_norms:
        def hook(name):
            def fn(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                acc = stats.act_sq.get(name)
                s = x.pow(2).sum(0)  # summed where the pass runs; to the CPU once, at the end
                stats.act_sq[name] = s if acc is None else acc + s
            return fn
        handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in mods.items()]
    params = [p for mod in mods.values() for p in (mod.weight, getattr(mod, "bias", None)) if p is not None]
    saved = {id(p): (p.requires_grad, p.grad) for p in params}
    all_params = list(model.parameters())
    frozen = {id(p): p.requires_grad for p in all_params}
    was_training = model.training
    starts = range(0, tokens.shape[0], batch_size)
    backoff = Backoff(batch_size, desc or "statistics pass")

    def attempt(rows: int) -> tuple[int, float]:
        """The pass from its checkpoint (or from nothing), each batch run in chunks of at most `rows`
        windows whose losses are weighted by their share of the batch: the same sums as whole batches."""
        for p in params:
            p.grad = None
        stats.act_sq.clear()
        stats.n_tokens, n_batches = 0, 0
        total_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
        if ckpt is not None and (restored := ckpt.load()) is not None:  # resume: the accumulators as they were
            n_batches, stats.n_tokens = restored["n_batches"], restored["n_tokens"]
            total_loss += restored["total_loss"]
            for key, t in restored["grad"].items():
                p = tracked[key]
                p.grad = t.to(device=p.device, dtype=p.dtype)
            stats.act_sq.update({k: t.to(device) for k, t in restored["act_sq"].items()})
        for i in progress(starts[n_batches:], desc, unit="batch"):
            ids = all_ids[i:i + batch_size]
            for lo, hi in chunks(ids.shape[0], rows):
                loss = causal_lm_loss(model, ids[lo:hi], loss_chunk)
                if hi - lo < ids.shape[0]:  # equal-length windows: a chunk's mean loss times its share
                    loss = loss * ((hi - lo) / ids.shape[0])
                if grads:
                    loss.backward()
                total_loss += loss.detach().double()
            n_batches += 1
            stats.n_tokens += ids.numel()
            if ckpt is not None and (n_batches % save_every == 0 or n_batches == len(starts)):
                ckpt.save(n_batches, float(total_loss), stats.n_tokens,
                          {k: p.grad for k, p in tracked.items() if p.grad is not None}, stats.act_sq)
        return n_batches, float(total_loss)

    def undo() -> None:
        if ckpt is not None:  # a snapshot there now is this pass's own (or the one it resumed from)
            ckpt.resume = True

    mode = recompute_activations(model) if checkpointing else nullcontext()
    try:
        model.eval()
        if grads:
            for p in all_params:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
                p.grad = None
        ctx = torch.enable_grad() if grads else torch.no_grad()
        all_ids = tokens.to(device)  # one copy to the device, not one per batch
        with ctx, mode:
            # out of memory part-way through a backward pass leaves part of a batch's gradient in the
            # accumulators: the pass starts again (from its checkpoint) with half the windows per call
            n_batches, total_loss = backoff.retry(attempt, undo)
        stats.act_sq = {k: v.cpu() for k, v in stats.act_sq.items()}
        if grads:  # the accumulated `.grad` itself is handed over (no copy), then detached from the weight
            for name, mod in mods.items():
                g = mod.weight.grad
                if g is None:
                    raise ShearkitError(f"No gradient reached {name}: the model's forward does not use it "
                                        "differentiably (a block it skips, e.g. config.num_hidden_layers below the "
                                        "number of blocks the model holds, or a detached output); make the forward "
                                        "run every decoder block.")
                mod.weight.grad = None
                stats.grads[name] = _handover(g.T if is_conv1d(mod) else g)
                b = getattr(mod, "bias", None)
                if b is not None and b.grad is not None:
                    stats.bias_grads[name], b.grad = _handover(b.grad), None
    finally:
        for h in handles:
            h.remove()
        for p in all_params:
            p.requires_grad_(frozen[id(p)])
        for p in params:
            rg, g = saved[id(p)]
            p.requires_grad_(rg)
            p.grad = g
        model.train(was_training)
    stats.loss = total_loss / max(n_batches, 1)
    return stats


class _PassCheckpoint:
    """The checkpoint of one statistics pass: snapshot folders (`io.stage_state.save_snapshot`,
    `snapshot-<batches>`, the newest kept) holding the accumulators after that many batches, for a
    pass over the same model, tokens and options (its identity; another is refused, naming what differs)."""

    def __init__(self, root, model: nn.Module, tokens: torch.Tensor, save_every: int, resume: bool, options: dict):
        from ..io.stage_state import tensor_digest
        from ..plan import base_fingerprint

        self.root, self.resume = Path(root), resume
        self.identity = {"fingerprint": base_fingerprint(model), "tokens": tensor_digest(tokens), "options": options}

    def load(self) -> dict | None:
        from ..io.stage_state import latest_snapshot, load_snapshot_tensors, read_state

        snap = latest_snapshot(self.root)
        state = read_state(snap, self.identity, resume=self.resume, what="statistics pass")
        if state is None:
            return None
        tensors = load_snapshot_tensors(snap, "statistics pass")
        return {**{k: state[k] for k in ("n_batches", "total_loss", "n_tokens")},
                "grad": {k[5:]: t for k, t in tensors.items() if k.startswith("grad.")},
                "act_sq": {k[7:]: t for k, t in tensors.items() if k.startswith("act_sq.")}}

    def save(self, n_batches: int, total_loss: float, n_tokens: int, grads: dict[str, torch.Tensor],
             act_sq: dict[str, torch.Tensor]) -> None:
        from ..io.stage_state import save_snapshot

        tensors = {**{f"grad.{k}": g for k, g in grads.items()}, **{f"act_sq.{k}": a for k, a in act_sq.items()}}
        save_snapshot(self.root, self.identity, {"n_batches": n_batches, "total_loss": total_loss,
                                                 "n_tokens": n_tokens}, tensors, n_batches)
