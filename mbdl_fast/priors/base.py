"""How priors meet complex images: the one place where (B, H, W) complex becomes (B, 2, H, W) real.

A prior is an ``nn.Module`` mapping real ``(B, C, H, W)`` to the same shape, called as
``prior(x)`` or deepinv-style ``prior(x, sigma)``. ``denoise(prior, x)`` applies it to complex
images through deepinv's real-packed layout, or directly to real images.
"""

from __future__ import annotations

import inspect

import torch

from mbdl_fast._validate import check_tensor, describe
from mbdl_fast.complex import from_real_packed, to_real_packed


def _takes_sigma(prior: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(prior.forward).parameters
    except (TypeError, ValueError):
        return False
    return "sigma" in params or len(params) >= 2


def denoise(prior: torch.nn.Module, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    """prior(x): complex (B, H, W) or (B, 1, H, W) through 2 real channels (B, 2, H, W) and back; real tensors
    (B, C, H, W) as they are (the prior checks them)."""
    if not isinstance(prior, torch.nn.Module):
        raise TypeError(f"prior: expected a torch.nn.Module, got {type(prior).__name__}")
    x = check_tensor("x", x)
    if x.is_complex() and not (x.dim() == 3 or (x.dim() == 4 and x.shape[1] == 1)):
        # A (B, 2, H, W) complex tensor would otherwise lose every channel but the first.
        raise ValueError(f"x: expected complex (B, H, W) or (B, 1, H, W) (one image per sample), got {describe(x)}")
    if not x.is_complex():
        return prior(x, sigma) if sigma is not None and _takes_sigma(prior) else prior(x)
    channel = x.dim() == 4
    packed = to_real_packed(x[:, 0] if channel else x)
    out = prior(packed, sigma) if sigma is not None and _takes_sigma(prior) else prior(packed)
    out = from_real_packed(out)
    return out.unsqueeze(1) if channel else out
