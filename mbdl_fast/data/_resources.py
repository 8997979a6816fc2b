"""Access to the data files shipped in ``mbdl_fast/data/files`` and resizing shared by the loaders."""

from __future__ import annotations

import functools
import io
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as functional


@functools.lru_cache(maxsize=4)
def load_npz(name: str) -> dict[str, np.ndarray]:
    """All arrays of a shipped ``.npz``, read once through importlib.resources (works from a wheel or a zip)."""
    ref = resources.files("mbdl_fast.data").joinpath("files", name)
    if not ref.is_file():
        raise FileNotFoundError(f"{name}: not found in the installed mbdl_fast package ({ref}); reinstall mbdl_fast")
    with np.load(io.BytesIO(ref.read_bytes()), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for a in arrays.values():
        a.setflags(write=False)  # cached: callers must copy
    return arrays


def parse_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``None``, an int ``n`` (meaning ``(n, n)``) or ``(H, W)``, all even and positive."""
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 and s % 2 == 0 for s in hw):
        raise ValueError(f"size: expected None, an even positive int or a pair (H, W) of them, got {size!r}")
    return hw  # type: ignore[return-value]


def resize(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize real ``(N, C, H, W)`` images in [0, 1] with antialiased bilinear interpolation.

    The antialiased bilinear kernel has non-negative weights summing to one, so values stay in
    [0, 1] up to rounding, which the clamp removes.
    """
    if tuple(images.shape[-2:]) == hw:
        return images
    out = functional.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)
