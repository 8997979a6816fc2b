"""Exact converters between the three complex layouts of the ecosystem.

- complex dtype ``(B, ...)``: ours and PyTorch's (``torch.complex64``);
- real-packed ``(B, 2, ...)``: deepinv's, channel 0 real, channel 1 imaginary; what priors see;
- fastMRI's ``(..., 2)``: a trailing real/imaginary axis.

All converters are exact (no arithmetic), so round trips are bit-identical.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import check_complex, check_tensor, describe


def to_real_packed(x: torch.Tensor) -> torch.Tensor:
    """complex ``(B, *S)`` -> real ``(B, 2, *S)`` (deepinv's layout)."""
    check_complex("x", x, "(B, ...)", tuple(range(1, 8)))
    return torch.stack((x.real, x.imag), dim=1)


def from_real_packed(x: torch.Tensor) -> torch.Tensor:
    """real ``(B, 2, *S)`` -> complex ``(B, *S)``."""
    check_tensor("x", x)
    if x.is_complex() or x.dim() < 2 or x.shape[1] != 2:
        raise ValueError(f"x: expected real-packed real (B, 2, ...), got {describe(x)}")
    return torch.complex(x[:, 0].contiguous(), x[:, 1].contiguous())


def to_fastmri(x: torch.Tensor) -> torch.Tensor:
    """complex ``(...)`` -> real ``(..., 2)`` (fastMRI's layout)."""
    check_complex("x", x, "(...)", tuple(range(0, 8)))
    return torch.view_as_real(x.resolve_conj()).clone()


def from_fastmri(x: torch.Tensor) -> torch.Tensor:
    """real ``(..., 2)`` -> complex ``(...)``."""
    check_tensor("x", x)
    if x.is_complex() or x.dim() < 1 or x.shape[-1] != 2:
        raise ValueError(f"x: expected fastMRI layout real (..., 2), got {describe(x)}")
    return torch.view_as_complex(x.contiguous())
