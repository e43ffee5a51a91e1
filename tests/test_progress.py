"""The long loops show a progress bar (tqdm, on stderr; TQDM_DISABLE=1 silences them all)."""
from __future__ import annotations

import os

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
def test_long_loops_show_progress(method, options, labels, capsys):
    if os.environ.get("TQDM_DISABLE"):
        pytest.skip("TQDM_DISABLE is set: tqdm was told to show no bars")
    shearkit.prune(make_tiny("llama"), None, method, 0.3, calib=CALIB, **options)
    err = capsys.readouterr().err
    for label in labels:
        assert label in err, (label, err[-500:])


@pytest.mark.slow  # a fresh interpreter: importing torch and transformers takes a while
def test_tqdm_disable_hides_every_bar():
    """TQDM_DISABLE=1 (read by tqdm at import) silences the bars: nothing is forced on."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import torch, shearkit\n"
        "torch.set_num_threads(1)\n"
        "from conftest import make_tiny\n"
        "calib = torch.randint(0, 320, (2, 8))\n"
        "for method in ('magnitude', 'wanda', 'besa', 'llm-pruner'):\n"
        "    shearkit.prune(make_tiny('llama'), None, method, 0.3, calib=calib)\n"
        "print('done')\n")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr[-2000:]
    assert "it/s" not in r.stderr and "batch/s" not in r.stderr and "block/s" not in r.stderr
    assert "%|" not in r.stderr, r.stderr[-2000:]
