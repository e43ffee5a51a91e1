"""Pruning methods: a registry of short modules built from shared parts.

Writing a method:
- its module defines a config dataclass (a subclass of `PruneConfig`, or of a base's config) and
  a class registered with `@register_method`, with `run(self, model, ctx) -> Plan`; `ctx` is a
  `MethodContext` (tokenizer, calibration windows, data folder, run directory, resume flag, seed;
  `ctx.trainer(...)` builds the shared `Trainer` for methods that train, `ctx.work_dir(name)` a
  folder for their checkpoints). The bases live beside it: `base.py` (`PruneConfig`,
  `PruneMethod`, `MethodContext`), `structured.py` (`StructuredMethod`: implement
  `score(model, ctx, layers)`; dense layers, allocation and planning are shared) and
  `blockwise.py` (`BlockwiseSparsifier`: implement `prune_layer` or `prune_block`) and `blocks.py`
  (`BlockMethod`: whole blocks scored and the lowest removed or replaced).
- add one line to `_MODULES` below: module, kind, description and the model families (`arch`
  adapter families) it supports. `shearkit list` and recipes read it without importing torch,
  the class gets its `kind` from it (declare it nowhere else), and `shearkit.prune` refuses the
  other families by name. The method x family test matrix (tests/test_method_matrix.py) runs
  every registered method on every family, so a new line here is tested without editing tests.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

from ..errors import ShearkitError, unknown
from ..recipe import build_config, register_section
from .base import MethodContext, PruneConfig, PruneMethod  # noqa: F401  (the bases, re-exported)


@dataclass
class MethodInfo:
    name: str
    kind: str  # structured | unstructured | blocks
    description: str
    module: str
    families: tuple[str, ...] = ()  # adapter families (see `shearkit list`) the method supports


ALL_FAMILIES = ("llama", "opt", "gpt2")  # every family `arch` adapts today

# name -> (module, kind, description, families): read without importing the module
_MODULES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "structured-magnitude": ("shearkit.methods.structured_magnitude", "structured", "Structured pruning by group weight magnitude (heads / KV groups, MLP channels).", ALL_FAMILIES),
    "llm-pruner": ("shearkit.methods.llm_pruner", "structured", "LLM-Pruner: structured pruning by first-order Taylor importance (calibration gradients).", ALL_FAMILIES),
    "loraprune": ("shearkit.methods.loraprune", "structured", "LoRAPrune: structured pruning during LoRA training, importance from the LoRA gradients.", ALL_FAMILIES),
    "lorashear": ("shearkit.methods.lorashear", "structured", "LoRAShear: knowledge distribution, LHSPG progressive structured pruning over LoRA, dynamic knowledge recovery.", ALL_FAMILIES),
    "shortgpt": ("shearkit.methods.shortgpt", "blocks", "ShortGPT: remove the decoder blocks with the lowest Block Influence (1 - cos(input, output)).", ALL_FAMILIES),
    "flexigpt": ("shearkit.methods.flexigpt", "blocks", "FlexiGPT: replace the lowest-BI blocks by weight-shared copies of kept blocks with low-rank adapters and output norms, then train those.", ("llama",)),
    "magnitude": ("shearkit.methods.magnitude", "unstructured", "Magnitude: per-layer |W| threshold, unstructured or N:M", ALL_FAMILIES),
    "wanda": ("shearkit.methods.wanda", "unstructured", "Wanda: |W|*||X|| per output row, unstructured or N:M", ALL_FAMILIES),
    "sparsegpt": ("shearkit.methods.sparsegpt", "unstructured", "SparseGPT: Hessian-based pruning with OBS weight updates", ALL_FAMILIES),
    "besa": ("shearkit.methods.besa", "unstructured", "BESA: learned per-layer/row sparsity, blockwise reconstruction", ALL_FAMILIES),
}

METHODS: dict[str, MethodInfo] = {k: MethodInfo(k, kind, desc, mod, tuple(fams))
                                  for k, (mod, kind, desc, fams) in _MODULES.items()}
_CLASSES: dict[str, type] = {}


def register_method(cls):
    """Class decorator registering a PruneMethod under `cls.name`; a class listed in `_MODULES`
    takes its kind from there."""
    if cls.name in _MODULES:
        kind = METHODS[cls.name].kind
        if cls.__dict__.get("kind", kind) != kind:
            raise ShearkitError(f"Method '{cls.name}' declares kind '{cls.kind}' but its `_MODULES` line says "
                                f"'{kind}'; declare the kind only in `_MODULES`.")
        cls.kind = kind
    elif cls.name not in METHODS:
        if not cls.families or not getattr(cls, "kind", None):
            raise ShearkitError(f"Method '{cls.name}' declares no model families or no kind; a method not listed "
                                f"in `_MODULES` sets `families` (e.g. {ALL_FAMILIES}) and `kind` on its class.")
        METHODS[cls.name] = MethodInfo(cls.name, cls.kind, (cls.__doc__ or "").strip().splitlines()[0], cls.__module__,
                                       tuple(cls.families))
    _CLASSES[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    """The method class registered under `name` (imported on first use)."""
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    if name not in _CLASSES:
        importlib.import_module(METHODS[name].module)
    return _CLASSES[name]


def check_family(name: str, model) -> None:
    """Refuse, naming the supported families, a model whose family method `name` does not support."""
    from ..arch import get_adapter
    from ..arch.modules import unwrap

    get_method(name)  # an unknown name is refused there
    info = METHODS[name]
    adapter = get_adapter(unwrap(model))  # an unknown architecture is refused here, by name
    if adapter.family not in info.families:
        raise ShearkitError(
            f"Method '{name}' does not support the {adapter.family} family (model type "
            f"'{adapter.config.model_type}'); it supports: {', '.join(info.families)}. Choose a method that "
            f"lists {adapter.family} in `shearkit list`.")


def method_config(data: dict) -> PruneConfig:
    """Build a method's config from a recipe's `prune` section (its `method` picks the class)."""
    data = dict(data)
    name = data.get("method")
    if not name:
        raise ShearkitError(f"The prune section needs a 'method'; methods: {', '.join(sorted(METHODS))}.")
    if not isinstance(name, str):
        raise ShearkitError(f"prune.method must be a method name, got {name!r}; methods: {', '.join(sorted(METHODS))}.")
    cls = get_method(name)
    if data.get("nm") is not None and not _takes_nm(cls):
        raise ShearkitError(f"N:M sparsity (--nm / prune.nm) applies only to unstructured methods, and '{name}' is "
                            f"{METHODS[name].kind}. Drop --nm, or use a method that takes it: "
                            f"{', '.join(nm_methods(data['nm']))}.")
    if data.get("blocks") is not None and METHODS[name].kind != "blocks":
        raise ShearkitError(f"A block count (--blocks / prune.blocks) applies only to block methods "
                            f"({', '.join(k for k, v in sorted(METHODS.items()) if v.kind == 'blocks')}), and "
                            f"'{name}' is {METHODS[name].kind}; use --ratio.")
    if data.get("allocation") is not None and METHODS[name].kind != "structured":
        raise ShearkitError(f"An allocation (--allocation / prune.allocation) applies only to structured methods "
                            f"({', '.join(k for k, v in sorted(METHODS.items()) if v.kind == 'structured')}), and "
                            f"'{name}' is {METHODS[name].kind}.")
    if "sparsity" in data and "ratio" not in data:  # alias used by the unstructured methods
        data["ratio"] = data.pop("sparsity")
    return build_config(cls.config_cls, data, "prune")


def _takes_nm(cls: type) -> bool:
    return any(f.name == "nm" for f in dataclasses.fields(cls.config_cls))


def nm_methods(nm: str = "2:4") -> list[str]:
    """The registered methods whose config accepts the N:M pattern `nm` (imports each unstructured method)."""
    out = []
    for k, info in sorted(METHODS.items()):
        if info.kind != "unstructured" or not _takes_nm(cls := get_method(k)):
            continue
        try:
            build_config(cls.config_cls, {"method": k, "nm": nm}, "prune")
        except ShearkitError:  # e.g. BESA: its allocation has nothing to decide under N:M
            continue
        out.append(k)
    return out


register_section("prune", method_config)
