"""Importance of whole decoder blocks: Block Influence (ShortGPT) and the perplexity drop.

Block Influence (Men et al., 2024, arXiv 2403.03853): BI_i = 1 - E_t cos(x_i,t, x_i+1,t), the
mean over calibration tokens t of the cosine (over the hidden dimension) between block i's
input and output hidden states. A block that barely turns the residual stream scores near 0.
It is computed once on the unpruned model with the blockwise runner (`calibration.blockwise`:
one block on the compute device at a time), so a model larger than the device can be scored.

Perplexity drop: the language-modelling perplexity of the calibration windows with block i
skipped (its output replaced by its input) minus that of the whole model; each block is skipped
alone, by a forward hook removed afterwards, so the model is left exactly as it was.

Both return one score per block, higher meaning more important (remove the lowest). Given a
`ScoreCheckpoint` (a run directory), both write what they have every `save_every` blocks (the
scores so far, and for BI the hidden states after the last scored block) and a resumed pass goes on
after the last block written, to the same scores.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..batching import Backoff
from ..calibration.blockwise import BlockInputs, capture_inputs, walk_blocks
from ..errors import ShearkitError

BLOCK_IMPORTANCE = ("bi", "ppl")


class ScoreCheckpoint:
    """The checkpoint of one block-scoring pass: snapshot folders under `root` (`io.stage_state`,
    `snapshot-<blocks done>`, the newest kept) written every `save_every` blocks, for a pass over the
    same weights, tokens and settings (its identity; another is refused, naming what differs)."""

    def __init__(self, root: str | Path, model: nn.Module, tokens: torch.Tensor, *, importance: str,
                 batch_size: int, save_every: int = 1, resume: bool = False):
        from ..io.stage_state import tensor_digest
        from ..plan import base_fingerprint

        self.root, self.save_every, self.resume = Path(root), save_every, resume
        self.identity = {"importance": importance, "fingerprint": base_fingerprint(model),
                         "tokens": tensor_digest(tokens), "batch_size": batch_size}

    def load(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The newest snapshot's state and tensors, or None when there is none."""
        from ..io.stage_state import latest_snapshot, load_snapshot_tensors, read_state

        snap = latest_snapshot(self.root)
        state = read_state(snap, self.identity, resume=self.resume, what="block scoring")
        if state is None:
            return None
        return state, load_snapshot_tensors(snap, "block scoring")

    def maybe_save(self, done: int, total: int, state: dict, tensors=None) -> None:
        """Write a snapshot after `done` of `total` blocks when one is due (every `save_every`, and the last)."""
        from ..io.stage_state import save_snapshot

        if self.save_every and (done % self.save_every == 0 or done == total):
            save_snapshot(self.root, self.identity, state, {} if done == total else dict(tensors or {}), done)


@torch.no_grad()
def block_influence(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1,
                    device: str | torch.device | None = None, offload_activations: bool = False,
                    checkpoint: ScoreCheckpoint | None = None) -> list[float]:
    """BI of every decoder block on calibration `tokens` (n, seqlen): 1 - mean per-token cosine
    between the block's input and output (float32)."""
    m = unwrap(model)
    total_blocks = get_adapter(m).num_layers
    inputs = capture_inputs(m, tokens, batch_size=batch_size, device=device,
                            offload_activations=offload_activations, desc="block influence: inputs")
    sums: list[float] = []
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:  # go on after the blocks scored before an interruption, from their output
        sums = [float(x) for x in saved[0]["sums"]]
        if len(sums) < total_blocks:
            store = inputs.store or inputs.device
            inputs.hidden = [saved[1][f"hidden.{b}"].to(store) for b in range(len(inputs))]
    held: dict[str, list[torch.Tensor]] = {}

    def keep_input(_view, inp: BlockInputs) -> None:
        held["x"] = inp.hidden  # walk_blocks replaces the list with the outputs; this one stays

    def compare(_view, out: BlockInputs) -> None:
        total = None  # summed where the activations are: one copy to the host per block, not per batch
        for x, y in zip(held.pop("x"), out.hidden):
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).double().sum()
            total = cos if total is None else total + cos
        sums.append(float(total))
        if checkpoint is not None:
            checkpoint.maybe_save(len(sums), total_blocks, {"sums": sums},
                                  {f"hidden.{b}": h for b, h in enumerate(out.hidden)})

    walk_blocks(m, inputs, keep_input, start=len(sums), after=compare, desc="block influence", changes=False)
    n = inputs.num_tokens
    return [1.0 - s / n for s in sums]


@torch.no_grad()
def perplexity_drop(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1,
                    checkpoint: ScoreCheckpoint | None = None) -> list[float]:
    """For each block, perplexity of `tokens` with that block alone skipped minus the whole
    model's (one full forward pass over `tokens` per block, plus one)."""
    from ..eval.perplexity import window_nll

    m = unwrap(model)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ShearkitError(f"Perplexity needs (samples, seqlen >= 2) tokens, got shape {tuple(tokens.shape)}.")
    count = tokens.shape[0] * (tokens.shape[1] - 1)

    backoff = Backoff(batch_size, "block perplexity")  # backs off once for all the passes

    def ppl() -> float:
        return math.exp(float(window_nll(m, tokens, backoff, desc="block perplexity").sum()) / count)

    saved = checkpoint.load() if checkpoint is not None else None
    base, out = (float(saved[0]["base"]), [float(x) for x in saved[0]["drops"]]) if saved else (ppl(), [])
    layers = get_adapter(m).layers
    for block in list(layers)[len(out):]:
        handle = block.register_forward_hook(_skip, with_kwargs=True)
        try:
            out.append(ppl() - base)
        finally:
            handle.remove()
        if checkpoint is not None:
            checkpoint.maybe_save(len(out), len(layers), {"base": base, "drops": out})
    return out


def _skip(_mod: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: the block returns its input hidden states in place of its output."""
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, torch.Tensor):
        return x
    return (x, *output[1:])


def block_scores(model: nn.Module, tokens: torch.Tensor, importance: str = "bi", *, batch_size: int = 1,
                 device: str | torch.device | None = None, offload_activations: bool = False,
                 checkpoint: ScoreCheckpoint | None = None) -> list[float]:
    """One score per block by `importance` (`bi` or `ppl`); higher: more important."""
    if importance == "bi":
        return block_influence(model, tokens, batch_size=batch_size, device=device,
                               offload_activations=offload_activations, checkpoint=checkpoint)
    if importance == "ppl":
        return perplexity_drop(model, tokens, batch_size=batch_size, checkpoint=checkpoint)
    raise ShearkitError(f"Block importance must be one of {', '.join(BLOCK_IMPORTANCE)}, got '{importance}'.")
