"""Architecture configs: plain JSON that rebuilds a model exactly, with no pickle.

Every model class that can be saved is registered under a name and implements

    to_config(self) -> dict       # JSON-serialisable constructor arguments (nested models as configs)
    from_config(cls, config) -> nn.Module

A config is ``{"class": NAME, "args": {...}}``; ``build(config)`` turns one back into a module. Importing
this module imports every built-in model (``mbdl_fast.solvers``, which imports ``mbdl_fast.priors``), so
any config the package writes builds from here; a user's own class registers with ``@register(NAME)``.
"""

from __future__ import annotations

import mbdl_fast.solvers  # noqa: F401  (registers every built-in model class)
from mbdl_fast._registry import build, config_of, register

__all__ = ["build", "config_of", "register"]
