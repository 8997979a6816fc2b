"""How priors meet complex images: the one place where (B, H, W) complex becomes (B, 2, H, W) real.

A prior is an ``nn.Module`` mapping real ``(B, C, H, W)`` to the same shape, called as
``prior(x)`` or deepinv-style ``prior(x, sigma)``. ``denoise(prior, x)`` applies it to complex
images through deepinv's real-packed layout, or directly to real images.
"""

from __future__ import annotations

import inspect

import torch

from mbdl_fast.complex import from_real_packed, to_real_packed


def _takes_sigma(prior: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(prior.forward).parameters
    except (TypeError, ValueError):
        return False
    return "sigma" in params or len(params) >= 2


def denoise(prior: torch.nn.Module, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    """prior(x): complex (B, H, W) or (B, 1, H, W) through 2 real channels and back; real tensors as they are."""
    if not x.is_complex():
        return prior(x, sigma) if sigma is not None and _takes_sigma(prior) else prior(x)
    channel = x.dim() == 4
    packed = to_real_packed(x[:, 0] if channel else x)
    out = prior(packed, sigma) if sigma is not None and _takes_sigma(prior) else prior(packed)
    out = from_real_packed(out)
    return out.unsqueeze(1) if channel else out
