"""One importance-estimation pass over calibration tokens, for every prunable group of a model.

The two gradient-based estimators side by side, so their cost can be compared on equal terms (same
tokens, same batches; `bench/bench_importance_memory.py` runs each in a child process of its own):
- `taylor_pass`: LLM-Pruner's first-order Taylor scores, from the weights' own gradients summed over
  the batches (a gradient the size of every weight is held);
- `lora_pass`: LoRAPrune's scores, from the gradients of LoRA factors attached to the frozen weights
  (only the factors' gradients are held; `G_hat` is formed one module at a time).
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch.modules import unwrap
from ..batching import Backoff, chunks
from ..graph.groups import layer_groups

Scores = dict[tuple[str, int], torch.Tensor]


def _all_sets(model: nn.Module) -> dict:
    from ..arch import get_adapter

    n = get_adapter(unwrap(model)).num_layers
    return {(kind, i): gs for i in range(n) for kind, gs in layer_groups(model, i).items()}


def taylor_pass(model: nn.Module, tokens: torch.Tensor, batch_size: int = 1, checkpointing: bool = False,
                loss_chunk: int = 0) -> Scores:
    """LLM-Pruner's element-wise Taylor score of every KV group and MLP channel (`checkpointing`:
    recompute activations in the backward pass; `loss_chunk`: output head on that many tokens at a time)."""
    from .scores import taylor
    from .stats import collect_stats

    stats = collect_stats(model, tokens, grads=True, batch_size=batch_size, checkpointing=checkpointing,
                          loss_chunk=loss_chunk)
    return {k: taylor(model, gs, stats) for k, gs in _all_sets(model).items()}


def lora_pass(model: nn.Module, tokens: torch.Tensor, batch_size: int = 1, checkpointing: bool = False,
              rank: int = 8, alpha: float = 16.0, loss_chunk: int = 0) -> Scores:
    """LoRAPrune's score of every KV group and MLP channel, from fresh LoRA factors' gradients.

    The factors are attached with peft (B starts at zero, so the first gradients reach B only),
    their gradients summed over the batches, and removed again afterwards."""
    from contextlib import nullcontext

    from peft import get_peft_model

    from ..arch.lm_head import causal_lm_loss
    from ..arch.modules import recompute_activations
    from ..recovery.lora import lora_config
    from .lora_grad import lora_group_scores

    was_training = model.training
    peft_model = get_peft_model(model, lora_config(model, rank, alpha, 0.0))
    peft_model.eval()
    device = next(model.parameters()).device
    factors = [p for p in peft_model.parameters() if p.requires_grad]
    all_ids = tokens.to(device)

    def attempt(rows: int) -> None:
        # from nothing again after running out of memory part-way (`batching.Backoff.retry`); a chunk's
        # mean loss is weighted by its share of the batch, so the summed gradients are the same
        for p in factors:
            p.grad = None
        for i in range(0, tokens.shape[0], batch_size):
            ids = all_ids[i:i + batch_size]
            for lo, hi in chunks(ids.shape[0], rows):
                loss = causal_lm_loss(peft_model, ids[lo:hi], loss_chunk)
                (loss if hi - lo == ids.shape[0] else loss * ((hi - lo) / ids.shape[0])).backward()

    with recompute_activations(model) if checkpointing else nullcontext():
        Backoff(batch_size, "LoRA importance pass").retry(attempt)
    scores = lora_group_scores(peft_model, _all_sets(peft_model))
    peft_model.unload()
    model.train(was_training)
    return scores
