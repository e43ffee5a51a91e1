"""Importance: calibration statistics (collected once) and scores over dependency groups."""
from .scores import AGGREGATIONS, TAYLOR_VARIANTS, aggregate, magnitude, score_groups, taylor, wanda
from .stats import Stats, block_linears, collect_stats

__all__ = ["AGGREGATIONS", "TAYLOR_VARIANTS", "aggregate", "magnitude", "score_groups", "taylor", "wanda",
           "Stats", "block_linears", "collect_stats"]
