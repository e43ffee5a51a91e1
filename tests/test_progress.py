"""The long loops show a progress bar (tqdm, on stderr; TQDM_DISABLE=1 silences them all)."""
from __future__ import annotations

import pytest
import torch

import shearkit

from conftest import VOCAB, make_tiny

CALIB = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method,options,labels", [
    ("magnitude", {}, ["magnitude blocks"]),
    ("wanda", {}, ["wanda calibration", "wanda blocks"]),
    ("besa", {"granularity": "layer"}, ["besa calibration", "besa block 0", "besa block 2", "loss="]),
    ("llm-pruner", {}, ["llm-pruner gradients"]),
])
def test_long_loops_show_progress(method, options, labels, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    shearkit.prune(make_tiny("llama"), None, method, 0.3, calib=CALIB, **options)
    err = capsys.readouterr().err
    for label in labels:
        assert label in err, (label, err[-500:])
