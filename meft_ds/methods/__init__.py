"""Registry of fine-tuning methods.

Adding a method is one new module in this package that defines a ``Method`` subclass
decorated with ``@register``; modules are discovered automatically.
"""

from __future__ import annotations

import importlib
import pkgutil

from meft_ds.errors import UserError
from meft_ds.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``--method cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def available() -> list[str]:
    """Names of all registered methods."""
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _discover()
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(available())}")
    return _REGISTRY[name]


__all__ = ["Method", "available", "get", "register"]
