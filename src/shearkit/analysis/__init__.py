"""Analyses that guide pruning: knowledge distribution (per node group sensitivity and targets)."""
from .masking import node_removal, zeroed
from .sensitivity import DEFAULT_GAMMA, PROXIES, analyze, plot_sensitivity, write_sensitivity
from .targets import allocate, most_sensitive, node_units

__all__ = ["node_removal", "zeroed", "DEFAULT_GAMMA", "PROXIES", "analyze", "plot_sensitivity",
           "write_sensitivity", "allocate", "most_sensitive", "node_units"]
