"""Calibration passes: blockwise activations, per-layer input statistics, checkpoints."""
from .blockwise import BlockInputs, capture_inputs, final_hidden, walk_blocks

__all__ = ["BlockInputs", "capture_inputs", "final_hidden", "walk_blocks"]
