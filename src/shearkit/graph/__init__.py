"""Dependency groups (minimally removable structures), plan checks and structured planning."""
from .groups import (KINDS, Group, GroupSet, Part, Slice, base_block_params, blocks, check_lora_shapes,
                     hidden_channels, kv_groups, layer_groups, mlp_channels, query_heads)
from .describe import describe_groups
from .removal import layer_geometry, normalize_entry, ratio_removed, removal_map

__all__ = ["describe_groups", "KINDS", "Group", "GroupSet", "Part", "Slice", "base_block_params", "blocks", "check_lora_shapes",
           "hidden_channels", "kv_groups", "layer_groups", "mlp_channels", "query_heads",
           "layer_geometry", "normalize_entry", "ratio_removed", "removal_map"]
