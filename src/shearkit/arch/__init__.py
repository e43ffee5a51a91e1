"""Architecture adapters: a uniform view of decoder blocks for every supported family."""
from .base import ArchAdapter, AttentionView, BlockView, MLPView, Proj
from .registry import get_adapter, register_adapter, supported_families, supported_model_types
from . import llama, opt, gpt2  # noqa: F401  (registration)

__all__ = ["ArchAdapter", "AttentionView", "BlockView", "MLPView", "Proj", "get_adapter",
           "register_adapter", "supported_families", "supported_model_types"]
