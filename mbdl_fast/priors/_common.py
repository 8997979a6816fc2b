"""Checks shared by the priors: input tensors, per-layer widths, configs.

Every prior stores the output width of each of its internal convolutions in one flat list,
``widths``; the prior's docstring gives the order and which entries are tied by residual
additions. ``width_layers()`` names the convolution that produces each entry and
``tied_widths()`` lists the groups of entries that must stay equal: this is what channel
pruning needs to shrink a prior and rebuild it from its config.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from mbdl_fast._validate import check_finite, check_nonempty, check_tensor, describe, value_checks_wanted


def check_prior_input(x: object, in_channels: int, prior: torch.nn.Module | None = None) -> torch.Tensor:
    """Require real floating ``(B, in_channels, H, W)``; a complex tensor gets a hint to use ``denoise``.

    With ``prior``, ``x`` must also have the dtype and device of its weights (outside autocast).
    """
    x = check_tensor("x", x)
    layout = f"(B, {in_channels}, H, W)"
    if x.is_complex():
        raise TypeError(
            f"x: expected real floating {layout}, got {describe(x)}; priors see complex images as 2 real "
            "channels: call mbdl_fast.priors.denoise(prior, x), which packs and unpacks them"
        )
    if not x.is_floating_point():
        raise TypeError(f"x: expected real floating {layout}, got {describe(x)}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x: expected real floating {layout}, got {describe(x)}")
    check_nonempty("x", x, layout)
    weight = next(prior.parameters(), None) if prior is not None else None
    if weight is not None:
        if x.device != weight.device:
            raise ValueError(f"x: expected a tensor on {weight.device} (the prior's weights), got {describe(x)}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            dtype = str(weight.dtype).replace("torch.", "")
            raise TypeError(f"x: expected {dtype} {layout} (the dtype of the prior's weights), got {describe(x)}")
    if value_checks_wanted():
        check_finite("x", x)
    return x


#: Bounds of the architecture arguments: far beyond any real prior, they keep a config (or a checkpoint's) from
#: asking for a network that takes minutes and gigabytes to build.
MAX_WIDTH = 65536
MAX_LAYERS = 1000


def positive_int(name: str, value: object, maximum: int = MAX_WIDTH) -> int:
    """``value`` as an int in [1, maximum] (bools refused: ``True`` is not a width)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name}: expected a positive int <= {maximum}, got {value!r}")
    return int(value)


def resolve_widths(
    uniform_name: str,
    uniform: int | None,
    widths: Sequence[int] | None,
    default: int,
    length: int,
    layout: str,
) -> tuple[int, ...]:
    """The flat widths list: ``widths`` as given, or ``uniform`` (else ``default``) repeated ``length`` times.

    ``layout`` describes the order of the entries for error messages.
    """
    if widths is None:
        value = positive_int(uniform_name, default if uniform is None else uniform)
        return (value,) * length
    if uniform is not None:
        raise TypeError(f"widths: pass either {uniform_name} or widths, not both")
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"widths: expected a list of {length} positive ints ({layout}), got {type(widths).__name__}")
    if len(widths) != length:
        raise ValueError(f"widths: expected {length} entries ({layout}), got {len(widths)}: {list(widths)}")
    bad = [
        (i, w) for i, w in enumerate(widths) if isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= MAX_WIDTH
    ]
    if bad:
        raise ValueError(
            f"widths: expected positive ints <= {MAX_WIDTH} ({layout}), got {bad[0][1]!r} at index {bad[0][0]}"
        )
    return tuple(int(w) for w in widths)


def kwargs_from_config(cls: type, config: object) -> dict[str, Any]:
    """Check that ``config`` is a dict of constructor arguments of ``cls``; missing ones take defaults."""
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict of {cls.__name__} arguments, got {type(config).__name__}")
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"config: unknown {cls.__name__} arguments {unknown}; known: {sorted(known)}")
    return dict(config)
