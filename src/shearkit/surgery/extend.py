"""Model extension (FlexiGPT section 3.5): grow a model by inserting weight-shared copies of its blocks.

`extension_layout` says where the copies go: over the span of blocks `start..end` (L blocks), the
`block` pattern repeats each block of the span in place (s, s', s+1, (s+1)', ...) and the
`sequential` pattern repeats the whole span after itself (s..e, s'..e'); either way K added blocks
repeat each block K / L times, so K must be a multiple of L (another K is refused with the K the
span takes and the spans that take K). `extend_blocks` then installs the copies with the block
surgery (`rebuild_blocks`: layer indices, KV-cache slots, `num_hidden_layers`, `layer_types`
renumbered) and makes each a shared copy of its original (`share_block`): the original's
projection weights by reference, its own rank-r adapters with LoRA's init (A random, B = 0) and
its own output norms with scale `norm_init` on the attention and MLP outputs (the paper: output
normalisation on the repeated blocks, not on the first occurrence). The originals are untouched,
so removing exactly the copies (`remove_blocks(model, copies)`) gives back the original model.

At init (B = 0) a copy adds to the residual stream, per sub-layer and token, `norm_init` times its
base sub-layer's output standardised over the hidden axis: a zero-mean vector of RMS at most
`norm_init`. With `norm_init = 0` the extended model computes exactly the original's logits.
"""
from __future__ import annotations

import copy
from torch import nn

from ..arch import get_adapter
from ..arch.modules import unwrap
from ..errors import ShearkitError
from .blocks import rebuild_blocks
from .shared_block import _check_family, refuse_shared, share_block

PATTERNS = ("block", "sequential")


def extension_layout(n: int, add_blocks: int, pattern: str = "block", start: int | None = None,
                     end: int | None = None) -> tuple[list[int], list[int]]:
    """For a model of `n` blocks: the original block at each position of the extended model and
    the positions that are copies. `start`/`end` (inclusive) default to the first and last block.

    Raises:
        ShearkitError: an unknown pattern, a span outside the model, or a K the span cannot take.
    """
    if pattern not in PATTERNS:
        raise ShearkitError(f"The extension pattern must be one of {', '.join(PATTERNS)}, got '{pattern}'.")
    if isinstance(add_blocks, bool) or not isinstance(add_blocks, int) or add_blocks < 1:
        raise ShearkitError(f"The number of added blocks must be a whole number >= 1, got {add_blocks!r}.")
    s = 0 if start is None else start
    e = n - 1 if end is None else end
    if not (isinstance(s, int) and isinstance(e, int) and 0 <= s <= e < n):
        raise ShearkitError(f"The span of repeated blocks, start {s} to end {e}, must lie within blocks 0..{n - 1} "
                            "with start <= end.")
    span = e - s + 1
    if add_blocks % span:
        fits = ", ".join(str(span * k) for k in range(1, 5))
        divisors = [d for d in range(1, min(add_blocks, n) + 1) if add_blocks % d == 0]
        mid = (n - divisors[-1]) // 2
        raise ShearkitError(
            f"{add_blocks} added blocks cannot be placed over blocks {s}..{e} ({span} blocks): the {pattern} pattern "
            f"repeats every block of the span equally often, so it adds a multiple of {span} ({fits}, ...). Choose "
            f"one of those, or a span whose length divides {add_blocks} ({', '.join(map(str, divisors))} blocks), "
            f"e.g. --start {mid} --end {mid + divisors[-1] - 1}.")
    repeats = add_blocks // span
    sources: list[int] = list(range(s))
    copies: list[int] = []
    if pattern == "block":
        for b in range(s, e + 1):
            sources.append(b)
            copies.extend(range(len(sources), len(sources) + repeats))
            sources.extend([b] * repeats)
    else:
        sources.extend(range(s, e + 1))
        for _ in range(repeats):
            copies.extend(range(len(sources), len(sources) + span))
            sources.extend(range(s, e + 1))
    sources.extend(range(e + 1, n))
    return sources, copies


def _detached_copy(block: nn.Module, config) -> nn.Module:
    """A copy of `block` whose parameters are its own except the projection weights, which stay the
    original's (no memory is allocated for them; `share_block` then replaces those layers)."""
    memo: dict[int, object] = {id(config): config}
    for mod in block.modules():
        if isinstance(mod, nn.Linear):
            for p in mod.parameters(recurse=False):
                memo[id(p)] = p
    return copy.deepcopy(block, memo)


def extend_blocks(model: nn.Module, add_blocks: int, pattern: str = "block", start: int | None = None,
                  end: int | None = None, *, rank: int, output_norm: bool = True,
                  norm_init: float = 1e-2) -> dict:
    """Insert `add_blocks` weight-shared copies as `pattern` places them over `start..end` (see the
    module doc), in place; returns {sources, copies, bases (copy -> its original's new position)}.

    Raises:
        ShearkitError: an unsupported family, a model that already has shared blocks, or a layout
            `extension_layout` refuses.
    """
    m = unwrap(model)
    _check_family(m)
    refuse_shared(m, "extending it")
    ad = get_adapter(m)
    n = ad.num_layers
    sources, copies = extension_layout(n, add_blocks, pattern, start, end)
    if not norm_init >= 0:
        raise ShearkitError(f"The output norms' initial scale must be >= 0, got {norm_init}.")
    old = list(ad.layers)
    is_copy = set(copies)
    modules = [_detached_copy(old[src], m.config) if j in is_copy else old[src] for j, src in enumerate(sources)]
    first = {}
    for j, src in enumerate(sources):
        first.setdefault(src, j)
    rebuild_blocks(m, sources, modules)
    bases = {j: first[sources[j]] for j in copies}
    for j in copies:
        share_block(m, j, bases[j], rank, init="lora", output_norm=output_norm, norm_init=norm_init)
    return {"sources": sources, "copies": copies, "bases": bases}

