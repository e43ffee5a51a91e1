"""Adapter registry: model_type -> adapter class."""
from __future__ import annotations

from ..errors import ShearkitError

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls):
    """Class decorator: register an ArchAdapter for each of its `model_types`."""
    for mt in cls.model_types:
        _ADAPTERS[mt] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def supported_families() -> dict[str, list[str]]:
    fams: dict[str, list[str]] = {}
    for mt, cls in _ADAPTERS.items():
        fams.setdefault(cls.family, []).append(mt)
    return fams


def get_adapter(model):
    """Return the adapter for `model`, or a clear error naming the supported architectures."""
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in _ADAPTERS:
        raise ShearkitError(
            f"Architecture '{mt}' ({type(model).__name__}) is not supported. Supported model types: "
            f"{', '.join(supported_model_types())}."
        )
    return _ADAPTERS[mt](model)
