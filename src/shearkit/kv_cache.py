"""The KV cache across transformers versions: a cache object the caller owns (updated in place by each
forward) and the keyword the model's forward takes it under (`cache` in recent transformers 5 releases,
`past_key_values` before; 5.24 warns that the old name goes in 5.40)."""
from __future__ import annotations

import inspect

from torch import nn

from .arch.modules import unwrap


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version's forward takes the KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module):
    """An empty dynamic KV cache for `model` (every layer's keys and values grow as tokens come)."""
    from transformers import DynamicCache

    return DynamicCache(config=unwrap(model).config)
