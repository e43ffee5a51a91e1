"""The language-model loss with the output head applied in chunks, so no step holds every token's
vocabulary logits at once.

A causal LM's loss forms (tokens, vocabulary) float logits, their log-softmax and, in the backward
pass, their gradient: for SmolLM2 (49,152 tokens in its vocabulary) at 4 x 256 tokens that is three
200 MB tensors, more than the rest of a checkpointed step. Here the decoder runs once, and the head
plus cross-entropy run on `chunk` tokens at a time under activation checkpointing: only the hidden
states are kept and one chunk's logits exist at a time (the head's matmul runs again in the
backward pass, a few per cent of a step's FLOPs). The summed loss is the same as the full one up to
float summation order.

Models whose logits are not `head(last hidden state)` (final-logit soft-capping, logit scaling) or
whose base model cannot be separated from the head get None from `split_head`; callers then form
the full logits as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .modules import unwrap

# config keys that make logits differ from head(hidden): soft-capping, scaling (Gemma 2, Granite, Cohere)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale")


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(base model giving the last hidden states, output head) of a transformers causal LM (peft
    wrappers looked through), or None when its logits are not simply `head(hidden)`."""
    lm = unwrap(model)
    base = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if base is None or base is lm or head is None:
        return None
    cfg = getattr(lm, "config", None)
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return base, head


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` (N, vocab) against `targets` (N,), `chunk` rows at a
    time; each chunk's logits are recomputed in the backward pass instead of kept."""
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled()
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk], targets[s:s + chunk]
        if grad:
            total = total + checkpoint(_chunk_ce, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_ce(head, h, t)
    return total


def label_hidden(base: nn.Module, input_ids: torch.Tensor, keep: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(positions where `keep` is True, hidden) last hidden states of the decoder."""
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    return hidden[keep]


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of `input_ids` (every position labelled), as
    `model(input_ids=ids, labels=ids).loss`; with `chunk` > 0 the head runs `chunk` tokens at a time
    where the model allows it (`split_head`)."""
    parts = split_head(model) if chunk > 0 else None
    if parts is None:
        return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    base, head = parts
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    keep[:, :-1] = True
    targets = input_ids[:, 1:].reshape(-1)
    return chunked_ce(head, label_hidden(base, input_ids, keep), targets, chunk) / targets.numel()
