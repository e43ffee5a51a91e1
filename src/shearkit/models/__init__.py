"""Loading models: hub ids, local directories, GGUF files and built-in names."""
from .loading import load, BUILTIN_MODELS

__all__ = ["load", "BUILTIN_MODELS"]
