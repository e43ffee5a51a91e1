"""Data: named sets, local data directory, hub fallback, calibration windows."""
from .sources import DATASETS, DATA_ENV, TextRows, load_instructions, load_rows, resolve_data_dir
from .calib import calibration_windows, tokenize_stream

__all__ = ["DATASETS", "DATA_ENV", "TextRows", "load_instructions", "load_rows", "resolve_data_dir",
           "calibration_windows", "tokenize_stream"]
