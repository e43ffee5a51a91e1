"""ShortGPT (Men et al., 2024, arXiv 2403.03853): remove the decoder blocks that change least.

Each block is scored by its Block Influence, BI = 1 - cos(block input, block output) averaged
over the calibration tokens (`importance.blocks`), and the lowest-scored blocks are deleted
outright. The result is a plain, shallower model of the same family: the saved model loads in
vanilla transformers (no remote code) and decodes with its KV cache.

Sample recipe:
```yaml
prune: {method: shortgpt, ratio: 0.3, importance: bi}   # or blocks: 9
calib: {dataset: c4, samples: 64, seqlen: 512}
```
Lifecycle (`methods.blocks.BlockMethod.run`): one blockwise pass over the calibration windows on
the unpruned model scores every block (`importance: ppl` instead runs the model once per block
with that block skipped); the plan names the `round(ratio x blocks)` lowest (or `blocks: K`);
`shearkit.prune` then removes them (`surgery.blocks.remove_blocks`: KV-cache indices, layer
count and per-layer config lists renumbered).

Deviations from the paper: calibration defaults to shearkit's (`c4` windows) rather than PG19;
the cosine is averaged over every position of every window (the paper's expectation over
tokens), computed in float32; the perplexity-drop alternative is the paper's comparison metric
made a selectable importance, scored on `ppl_samples` calibration windows.
"""
from __future__ import annotations

from . import register_method
from .blocks import BlockConfig, BlockMethod


@register_method
class ShortGPT(BlockMethod):
    """ShortGPT: remove the decoder blocks with the lowest Block Influence."""

    name = "shortgpt"
    config_cls = BlockConfig
    lazy_ok = True  # scores one block at a time and removes whole blocks: no weight is changed
    needs_calibration = True
