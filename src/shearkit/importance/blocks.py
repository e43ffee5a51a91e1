"""Importance of whole decoder blocks: Block Influence (ShortGPT) and the perplexity drop.

Block Influence (Men et al., 2024, arXiv 2403.03853): BI_i = 1 - E_t cos(x_i,t, x_i+1,t), the
mean over calibration tokens t of the cosine (over the hidden dimension) between block i's
input and output hidden states. A block that barely turns the residual stream scores near 0.
It is computed once on the unpruned model with the blockwise runner (`calibration.blockwise`:
one block on the compute device at a time), so a model larger than the device can be scored.

Perplexity drop: the language-modelling perplexity of the calibration windows with block i
skipped (its output replaced by its input) minus that of the whole model; each block is skipped
alone, by a forward hook removed afterwards, so the model is left exactly as it was.

Both return one score per block, higher meaning more important (remove the lowest).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..calibration.blockwise import BlockInputs, capture_inputs, walk_blocks
from ..errors import ShearkitError

BLOCK_IMPORTANCE = ("bi", "ppl")


@torch.no_grad()
def block_influence(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1,
                    device: str | torch.device | None = None, offload_activations: bool = False) -> list[float]:
    """BI of every decoder block on calibration `tokens` (n, seqlen): 1 - mean per-token cosine
    between the block's input and output (float32)."""
    m = unwrap(model)
    inputs = capture_inputs(m, tokens, batch_size=batch_size, device=device,
                            offload_activations=offload_activations, desc="block influence: inputs")
    sums: list[float] = []
    held: dict[str, list[torch.Tensor]] = {}

    def keep_input(_view, inp: BlockInputs) -> None:
        held["x"] = inp.hidden  # walk_blocks replaces the list with the outputs; this one stays

    def compare(_view, out: BlockInputs) -> None:
        total = 0.0
        for x, y in zip(held.pop("x"), out.hidden):
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            total += float(cos.double().sum())
        sums.append(total)

    walk_blocks(m, inputs, keep_input, after=compare, desc="block influence")
    n = inputs.num_tokens
    return [1.0 - s / n for s in sums]


@torch.no_grad()
def perplexity_drop(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 1) -> list[float]:
    """For each block, perplexity of `tokens` with that block alone skipped minus the whole
    model's (one full forward pass over `tokens` per block, plus one)."""
    from ..eval.perplexity import window_nll

    m = unwrap(model)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ShearkitError(f"Perplexity needs (samples, seqlen >= 2) tokens, got shape {tuple(tokens.shape)}.")
    count = tokens.shape[0] * (tokens.shape[1] - 1)

    def ppl() -> float:
        return math.exp(float(window_nll(m, tokens, batch_size, desc="block perplexity").sum()) / count)

    base = ppl()
    out = []
    for block in get_adapter(m).layers:
        handle = block.register_forward_hook(_skip, with_kwargs=True)
        try:
            out.append(ppl() - base)
        finally:
            handle.remove()
    return out


def _skip(_mod: nn.Module, args: tuple, kwargs: dict, output):
    """Forward hook: the block returns its input hidden states in place of its output."""
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, torch.Tensor):
        return x
    return (x, *output[1:])


def block_scores(model: nn.Module, tokens: torch.Tensor, importance: str = "bi", *, batch_size: int = 1,
                 device: str | torch.device | None = None, offload_activations: bool = False) -> list[float]:
    """One score per block by `importance` (`bi` or `ppl`); higher: more important."""
    if importance == "bi":
        return block_influence(model, tokens, batch_size=batch_size, device=device,
                               offload_activations=offload_activations)
    if importance == "ppl":
        return perplexity_drop(model, tokens, batch_size=batch_size)
    raise ShearkitError(f"Block importance must be one of {', '.join(BLOCK_IMPORTANCE)}, got '{importance}'.")
