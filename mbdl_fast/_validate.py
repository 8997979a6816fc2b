"""Argument checks shared by every public entry point.

Errors name the argument, what was expected and what came, e.g.
``coil_maps: expected complex64 (B, C, H, W), got float32 (8, 2, 320, 320) on cpu``.
"""

from __future__ import annotations

import torch


def describe(t: torch.Tensor) -> str:
    """Short description of a tensor for error messages: dtype, shape, device."""
    dtype = str(t.dtype).replace("torch.", "")
    return f"{dtype} {tuple(t.shape)} on {t.device}"


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_complex(name: str, t: object, layout: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """Require a complex tensor with ``ndim`` dimensions (``layout`` names them, e.g. "(B, H, W)").

    A real tensor whose dimension 1 has size 2 is recognised as deepinv's real-packed layout and
    refused with a hint to convert it, never reinterpreted silently.
    """
    t = check_tensor(name, t)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not t.is_complex():
        hint = ""
        if t.dim() >= 2 and t.shape[1] == 2:
            hint = " (this looks real-packed (B, 2, ...): convert with mbdl_fast.complex.from_real_packed)"
        elif t.dim() >= 1 and t.shape[-1] == 2:
            hint = " (this looks fastMRI's (..., 2) layout: convert with mbdl_fast.complex.from_fastmri)"
        raise TypeError(f"{name}: expected complex {layout}, got {describe(t)}{hint}")
    if t.dim() not in ndims:
        raise ValueError(f"{name}: expected complex {layout}, got {describe(t)}")
    return t


def check_real(name: str, t: object, layout: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """Require a real floating tensor with ``ndim`` dimensions."""
    t = check_tensor(name, t)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.is_complex() or not t.is_floating_point() or t.dim() not in ndims:
        raise TypeError(f"{name}: expected real floating {layout}, got {describe(t)}")
    return t


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse NaN or Inf: they would propagate silently through every iteration of a solver."""
    if not bool(torch.isfinite(t).all()):
        what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name}: contains {what} ({describe(t)})")
    return t


def check_same_device(pairs: list[tuple[str, torch.Tensor]]) -> None:
    """All named tensors must live on the device of the first one."""
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (like {first_name}), got {describe(t)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {layout}, got {describe(t)}")
    return t


def check_broadcastable(name: str, t: torch.Tensor, target: tuple[int, ...], layout: str) -> torch.Tensor:
    """``t`` must broadcast to ``target`` without growing ``target`` (no silent broadcast of the data)."""
    if t.dim() > len(target):
        raise ValueError(
            f"{name}: expected at most {len(target)} dims broadcastable to {layout} {target}, got {describe(t)}"
        )
    for got, want in zip(reversed(t.shape), reversed(target), strict=False):
        if got not in (1, want):
            raise ValueError(f"{name}: expected a shape broadcastable to {layout} {target}, got {describe(t)}")
    return t
