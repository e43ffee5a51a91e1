"""shearkit: prune large language models and recover them with LoRA.

    import shearkit as sk
    model, tok = sk.load("smollm2-135m")
    print(sk.evaluate(model, tok, tasks=["wikitext2"], seqlen=512, limit=8))

Heavy modules (torch, transformers) load on first use of an API function, so that
`import shearkit` and `shearkit --help` stay fast.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import ShearkitError

_LAZY = {
    "load": "shearkit.api",
    "evaluate": "shearkit.api",
    "bench": "shearkit.api",
    "generate": "shearkit.api",
    "export_gguf": "shearkit.api",
    "prune": "shearkit.pruning",
    "apply_plan": "shearkit.pruning",
    "extend": "shearkit.extension",
    "speculative_generate": "shearkit.speculative",
    "Plan": "shearkit.plan",
    "save": "shearkit.io.save",
    "recover": "shearkit.recovery",
    "get_adapter": "shearkit.arch",
    "load_recipe": "shearkit.recipe",
    "analyze": "shearkit.analysis",
    "describe_groups": "shearkit.graph",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shearkit' has no attribute '{name}'")


__all__ = ["__version__", "ShearkitError", *_LAZY]
