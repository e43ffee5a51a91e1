"""Input/output: atomic writes, saving and reloading pruned models."""
