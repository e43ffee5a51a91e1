"""Unstructured and N:M sparsity: masks, Wanda, SparseGPT, BESA allocation, masks sidecar, plots."""
from .apply import apply_masks, load_masks, masks_from_model, save_masks
from .masks import layer_mask, nm_mask, parse_nm, row_mask
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask, wanda_scores

__all__ = ["apply_masks", "layer_mask", "load_masks", "masks_from_model", "nm_mask", "parse_nm", "row_mask",
           "save_masks", "sparsegpt_prune", "wanda_mask", "wanda_scores"]
