"""Self-speculative greedy decoding (FlexiGPT section 4.2): draft with the model minus some blocks,
verify with the whole model; the output is the whole model's greedy output, token for token.

The draft is a view of the same model, not a copy: `skipping_blocks` installs the kept blocks
(the same modules, the same weights) with the block surgery (`rebuild_blocks`: layer indices
and per-layer config renumbered) for the duration of a draft step and puts everything back
afterwards. Draft and full model each keep their own KV cache. Each round the draft proposes
`lookahead` tokens one at a time; the full model scores the last accepted token and the
proposals in one forward, keeps the longest prefix of proposals equal to its own greedy choices
and adds its own next token; both caches are then cut back to the accepted tokens (a rejected
proposal leaves nothing behind). By default the draft skips the model's shared copies (FlexiGPT's
replacement blocks, or the blocks `shearkit extend` added): the draft is then the ShortGPT model
(or the original model) inside the FlexiGPT (or extended) one.

Greedy only, one sequence at a time. Whether it is faster depends on how often the draft agrees
and on how much cheaper it is: the draft still runs the embeddings and the output head.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .arch import get_adapter
from .arch.modules import unwrap
from .errors import ShearkitError
from .kv_cache import cache_kwarg, new_cache

_MISSING = object()


@dataclass
class SpeculativeOutput:
    """The generated sequence (prompt included, shape (1, length)) and how the drafts fared."""

    sequences: torch.Tensor
    rounds: int
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        """The fraction of drafted tokens the full model kept."""
        return self.accepted / self.drafted if self.drafted else 0.0


def shared_copy_blocks(model: nn.Module) -> list[int]:
    """The blocks that compute with another block's weights (FlexiGPT replacements, extension copies)."""
    from .surgery.shared_block import shared_spec

    spec = shared_spec(unwrap(model))
    return sorted(int(k) for k in spec["blocks"]) if spec else []


@contextmanager
def skipping_blocks(model: nn.Module, skip: Sequence[int]) -> Iterator[nn.Module]:
    """Inside the block, `model` runs without blocks `skip` (same modules, renumbered, per-layer
    config rewritten); everything is restored on exit."""
    from .io.modeling import LAYER_SHAPES_KEY
    from .surgery.blocks import PER_LAYER_LISTS, rebuild_blocks

    m = unwrap(model)
    ad = get_adapter(m)
    full = ad.layers
    gone = set(skip)
    keep = [i for i in range(len(full)) if i not in gone]
    cfg = m.config
    keys = ("num_hidden_layers", "max_window_layers", LAYER_SHAPES_KEY, *PER_LAYER_LISTS)
    saved_cfg = {k: cfg.__dict__.get(k, _MISSING) for k in keys}
    saved_idx = [(mod, mod.layer_idx) for blk in full for mod in blk.modules()
                 if isinstance(getattr(mod, "layer_idx", None), int)]
    parent_path, _, leaf = ad.layers_path.rpartition(".")
    parent = m.get_submodule(parent_path) if parent_path else m
    rebuild_blocks(m, keep)
    try:
        yield model
    finally:
        setattr(parent, leaf, full)
        for mod, idx in saved_idx:
            mod.layer_idx = idx
        for k, v in saved_cfg.items():
            if v is _MISSING:
                cfg.__dict__.pop(k, None)
            else:
                setattr(cfg, k, v)


def _cut(cache, length: int) -> None:
    """Drop the cached positions from `length` on (negative crop: remove that many, in every version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()
def speculative_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 64, *,
                         skip: Sequence[int] | None = None, lookahead: int = 4,
                         eos_token_id: int | Sequence[int] | None = None) -> SpeculativeOutput:
    """Greedy decoding of `input_ids` (1, n) with drafts from the model without blocks `skip`
    (default: its shared copies); returns the same tokens as `model.generate(do_sample=False)`.

    Raises:
        ShearkitError: a batch of more than one sequence, no block to skip (or every block), a
            block index out of range, or a lookahead / token count below 1.
    """
    m = unwrap(model)
    n = get_adapter(m).num_layers
    skip = shared_copy_blocks(m) if skip is None else sorted({int(s) for s in skip})
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ShearkitError(f"Speculative decoding takes one sequence, shape (1, length); got {tuple(input_ids.shape)}.")
    if not skip:
        raise ShearkitError("The model has no shared blocks for the draft to skip; name the blocks to skip (skip=[...]).")
    if any(not 0 <= s < n for s in skip) or len(skip) >= n:
        raise ShearkitError(f"The draft skips blocks {skip}: each must be in 0..{n - 1} and one block must stay.")
    if lookahead < 1 or max_new_tokens < 1:
        raise ShearkitError(f"lookahead and max_new_tokens must be >= 1, got {lookahead} and {max_new_tokens}.")
    if eos_token_id is None:
        eos_token_id = getattr(getattr(m, "generation_config", None), "eos_token_id", None)
    eos = set() if eos_token_id is None else {int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int)
                                                               else eos_token_id)}
    kw = cache_kwarg(m)
    was_training = m.training
    m.eval()
    full_cache = new_cache(m)
    with skipping_blocks(m, skip):
        draft_cache = new_cache(m)
    seq = input_ids[0].tolist()
    start = len(seq)
    device = input_ids.device

    def run(cache, tokens: list[int], keep: int) -> torch.Tensor:
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        return m(input_ids=ids, use_cache=True, logits_to_keep=keep, **{kw: cache}).logits[0]

    seq.append(int(run(full_cache, seq, 1)[-1].argmax()))  # prefill: the first token is the full model's
    rounds = drafted = accepted = 0
    while len(seq) - start < max_new_tokens and seq[-1] not in eos:
        k = min(lookahead, max_new_tokens - (len(seq) - start))
        proposals: list[int] = []
        with skipping_blocks(m, skip):
            pending = seq[draft_cache.get_seq_length():]  # what the draft has not seen, ending in the last token
            for _ in range(k):
                proposals.append(int(run(draft_cache, pending, 1)[-1].argmax()))
                pending = proposals[-1:]
                if proposals[-1] in eos:
                    break
        base = len(seq) - 1  # the full cache holds every token but the last
        choice = run(full_cache, [seq[-1], *proposals], 0).argmax(-1).tolist()
        a = 0
        while a < len(proposals) and proposals[a] == choice[a]:
            a += 1
        rounds, drafted, accepted = rounds + 1, drafted + len(proposals), accepted + a
        for tok in [*proposals[:a], choice[a]]:  # up to an end-of-sequence token or the limit, as generate does
            seq.append(tok)
            if tok in eos or len(seq) - start >= max_new_tokens:
                break
        _cut(full_cache, min(base + 1 + a, len(seq) - 1))
        _cut(draft_cache, min(draft_cache.get_seq_length(), len(seq) - 1))
    m.train(was_training)
    return SpeculativeOutput(torch.tensor([seq], dtype=torch.long, device=device), rounds, drafted, accepted)


__all__ = ["SpeculativeOutput", "speculative_generate", "skipping_blocks", "shared_copy_blocks"]
