"""Forward FLOPs per token, from the adapter's view of the model (pruned layers count their own widths).

For a prefill of L tokens, per token (multiply-add = 2 FLOPs):
    projections   2 * sum over linear weights in the blocks of (out x in), plus 2 x rank x (out + in)
                  for the low-rank adapters of shared blocks (FlexiGPT, which keep the full compute)
    attention     4 * n_q_heads * head_dim * (L + 1) / 2     (QK^T and AV, causal: mean context)
    lm_head       2 * hidden * vocab
Norms, activations, RoPE and the embedding lookup are left out (small, memory-bound).
The ideal speed-up of a pruned model is FLOPs(dense) / FLOPs(pruned) at the same L.
"""
from __future__ import annotations

from ..arch import get_adapter


def forward_flops_per_token(model, seqlen: int) -> dict[str, float]:
    """FLOPs per token of a prefill of `seqlen` tokens, split into parts and totalled."""
    ad = get_adapter(model)
    proj = attn = 0.0
    mean_ctx = (seqlen + 1) / 2
    for b in ad.blocks():
        seen = set()
        for p in b.projections():
            key = (p.name, p.out_offset)
            if key in seen:
                continue
            seen.add(key)
            proj += 2.0 * p.out_features * p.in_features
            proj += 2.0 * getattr(p.module, "rank", 0) * (p.out_features + p.in_features)  # a shared block's adapter
        attn += 4.0 * b.attn.num_heads * b.attn.head_dim * mean_ctx
    head = 2.0 * ad.hidden_size * model.config.vocab_size
    return {"projections": proj, "attention": attn, "lm_head": head, "total": proj + attn + head}
