"""Per-layer input statistics gathered with forward hooks while a block runs on its inputs.

Wanda needs each input column's squared norm over all calibration tokens; SparseGPT needs the
layer-input Hessian `H = 2/N * X^T X`. Both are accumulated in float32 over batches, so memory
is one (in,) vector or one (in, in) matrix per layer, never the activations themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blockwise import BlockInputs


@dataclass
class InputStats:
    """Running statistics of one layer's inputs (columns = input features)."""

    want_hessian: bool = False
    sq_norm: torch.Tensor | None = None  # (in,) sum over tokens of x_j^2
    hessian: torch.Tensor | None = None  # (in, in) 2/N * sum x x^T, when asked for
    tokens: int = 0

    @property
    def col_norm(self) -> torch.Tensor:
        """Euclidean norm of each input column over all tokens (Wanda's ||X_j||_2)."""
        return self.sq_norm.sqrt()

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        n = x.shape[0]
        if self.sq_norm is None:  # allocated on first use: the input width is read from x
            self.sq_norm = torch.zeros(x.shape[1], device=x.device)
            if self.want_hessian:
                self.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.sq_norm += x.pow(2).sum(0)
        if self.hessian is not None:
            # running mean of 2 x x^T, rescaled as tokens arrive (SparseGPT's convention)
            self.hessian *= self.tokens / (self.tokens + n)
            self.hessian += (2.0 / (self.tokens + n)) * (x.T @ x)
        self.tokens += n


@torch.no_grad()
def collect_input_stats(block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs,
                        hessian: bool = False, outputs: list | None = None) -> dict[str, InputStats]:
    """Run `block` over `inputs` and accumulate the inputs each of `modules` receives.

    Layers fed the very same tensor (q, k and v; gate and up) share one `InputStats`, so a
    Hessian is computed and stored once per distinct input rather than once per layer (the
    sharing is decided on the first batch, holding those inputs alive so that no address is
    reused). When a list is passed as `outputs`, the block's outputs of this same pass are
    appended to it.

    A block call that runs out of memory has added part of its inputs already, so the pass starts
    again from empty statistics with the batches run in chunks of half the rows (`inputs.backoff`);
    the statistics are the same sums over the same tokens, in another float order.
    """
    stats: dict[str, InputStats] = {}
    leader: dict[str, str] = {}  # module -> the module whose statistics it shares
    seen: list[tuple[torch.Tensor, str]] = []  # first batch: (input, module that owns it)
    batch = [-1]

    def hook(name):
        def fn(_m, args, _out):
            x = args[0]
            if batch[0] == 0:
                lead = next((n for t, n in seen if t is x), None)
                if lead is not None:
                    leader[name], stats[name] = lead, stats[lead]
                    return
                seen.append((x, name))
                leader[name], stats[name] = name, InputStats(want_hessian=hessian)
            if leader[name] == name:
                stats[name].add(x)
        return fn

    def next_batch(*_):
        batch[0] += 1
        if batch[0] > 0:
            seen.clear()

    def attempt(rows: int) -> list[torch.Tensor]:
        stats.clear()
        leader.clear()
        seen.clear()
        batch[0] = -1
        return inputs.forward(block, rows=rows)

    handles = [mod.register_forward_hook(hook(name)) for name, mod in modules.items()]
    handles.append(block.register_forward_pre_hook(next_batch))
    try:
        out = inputs.backoff.retry(attempt)
        if outputs is not None:
            outputs.extend(out)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return stats
