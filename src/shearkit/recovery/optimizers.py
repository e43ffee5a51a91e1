"""The trainer's optimizer: a name (`adamw`, `sgd`) or a factory of the caller's own.

An `OptimizerFactory` is called as `factory(params, config)` with the trainable parameters and
the `RecoverConfig`, and returns a `torch.optim.Optimizer` over them (a method's own optimizer,
e.g. LoRAShear's LHSPG, plugs in this way).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from ..errors import ShearkitError, unknown
from .config import RecoverConfig

OptimizerFactory = Callable[[list[torch.nn.Parameter], RecoverConfig], torch.optim.Optimizer]


def _adamw(params: list[torch.nn.Parameter], config: RecoverConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _sgd(params: list[torch.nn.Parameter], config: RecoverConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)


OPTIMIZERS: dict[str, OptimizerFactory] = {"adamw": _adamw, "sgd": _sgd}


def build_optimizer(spec: Union[str, OptimizerFactory], params: list[torch.nn.Parameter],
                    config: RecoverConfig) -> torch.optim.Optimizer:
    """The optimizer named by `spec` (or made by the factory `spec`) over `params`, lr from `config`."""
    if isinstance(spec, str):
        if spec not in OPTIMIZERS:
            raise unknown("optimizer", spec, OPTIMIZERS)
        return OPTIMIZERS[spec](params, config)
    if not callable(spec):
        raise ShearkitError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or a callable "
                            f"factory(params, config), got {type(spec).__name__}.")
    opt = spec(params, config)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ShearkitError(f"The optimizer factory {getattr(spec, '__name__', spec)!r} returned "
                            f"{type(opt).__name__}, not a torch.optim.Optimizer.")
    return opt
