"""The table of model classes buildable from configs (the leaf that priors and solvers register into).

The public front door is ``mbdl_fast.registry``, which also imports every built-in model so that any
shipped config builds; the model modules import this leaf instead, so that no import cycle forms.

Architecture configs: plain JSON that rebuilds a model exactly, with no pickle.

Every model class that can be saved is registered under a name and implements

    to_config(self) -> dict       # JSON-serialisable constructor arguments (nested models as configs)
    from_config(cls, config) -> nn.Module

A config is ``{"class": NAME, "args": {...}}``; ``build(config)`` turns one back into a module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_REGISTRY: dict[str, type[torch.nn.Module]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` buildable from configs whose ``"class"`` is ``name``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"register: the name {name!r} is taken by {_REGISTRY[name].__qualname__}")
        _REGISTRY[name] = cls
        cls.config_name = name
        return cls

    return wrap


def config_of(model: torch.nn.Module) -> dict[str, Any]:
    """``{"class": name, "args": model.to_config()}`` for a registered model."""
    name = getattr(type(model), "config_name", None)
    if name is None or _REGISTRY.get(name) is not type(model):
        raise TypeError(f"model: expected a registered mbdl_fast model class, got {type(model).__qualname__}")
    return {"class": name, "args": model.to_config()}


def build(config: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a model from ``{"class": NAME, "args": {...}}``; unknown names are errors listing the known ones.

    Nested configs build through here too: a model module imports the classes it nests before it builds them."""
    if not isinstance(config, dict) or "class" not in config or "args" not in config:
        raise ValueError(f"config: expected {{'class': NAME, 'args': {{...}}}}, got {str(config)[:200]}")
    name = config["class"]
    if name not in _REGISTRY:
        raise ValueError(f"config: unknown model class {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name].from_config(config["args"])
