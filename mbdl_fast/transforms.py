"""Exact rotations of the image plane by quarter turns, and of the operators that live in it.

The rotation group used for equivariant imaging (EI / REI) is the cyclic group of quarter turns
C4 = {R^0, R^1, R^2, R^3}, acting on the last two dims of any image tensor ``(..., H, W)`` (complex
MRI images ``(B, H, W)``, real ``(B, C, H, W)``, coil maps ``(B, C, H, W)``).

The turn is about the pixel ``(H // 2, W // 2)``, circularly: with centred coordinates
u = (i - H // 2) mod H, v = (j - W // 2) mod W, a quarter turn (counter-clockwise, as
``torch.rot90(x, 1, dims=(-2, -1))``) maps

    (R x)[u, v] = x[v, -u]            (indices mod H = W),

so R is a permutation of pixels: exact, invertible, R^4 = I. That pixel is the origin of the centred
FFT (``fftc``'s ``fftshift`` puts the zero frequency at index N // 2 for even and odd N alike), and a
rotation about the origin of the discrete Fourier grid commutes with the DFT (the DFT of x∘R^{-1} is
X∘R^{-1} for orthogonal integer R):

    fftc(R x) = R fftc(x).

For odd sizes this rotation is exactly ``torch.rot90``. For even sizes ``torch.rot90`` turns about the
geometric centre ((N - 1)/2, (N - 1)/2), half a pixel away from the Fourier origin, and its k-space is
the rotated k-space times a linear phase and shifted by one sample; here the turn is ``torch.rot90``
followed by a one-pixel circular shift (the edge row or column, background in MRI, wraps around).

Multi-coil MRI (A x = M ⊙ F(S ⊙ x)) rotates its coil maps with the image and keeps its mask:

    A_R (R x) = M ⊙ F(R S ⊙ R x) = M ⊙ R F(S ⊙ x),

i.e. for a fully sampled mask the rotated acquisition is exactly the rotated k-space; with
undersampling the same mask now keeps other frequencies of the object, which is the information
equivariant imaging exploits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["check_rotations", "rotate", "rotate_physics"]


def _centre_flip(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x[(-u) mod N] along ``dim`` in centred coordinates: ``flip`` plus, for even N, a one-pixel roll."""
    out = x.flip(dim)
    # flip maps index i to N - 1 - i; the centred reflection maps it to (N - i) mod N: one further.
    return out.roll(1, dims=dim) if x.shape[dim] % 2 == 0 else out


def check_rotations(rotations: tuple[int, ...], height: int, width: int) -> None:
    """Refuse quarter turns 1 or 3 (90 / 270 degrees) on non-square ``(height, width)`` images."""
    odd = sorted({k % 4 for k in rotations if k % 2})
    if odd and height != width:
        degrees = ", ".join(f"{90 * k}" for k in odd)
        raise ValueError(
            f"rotations: {degrees} degrees need square images, got H x W = {height} x {width}; "
            "use rotations=(2,) (180 degrees) for non-square images"
        )


def rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate ``x`` ``(..., H, W)`` by ``k`` quarter turns about pixel (H // 2, W // 2) (module docstring).

    Counter-clockwise as ``torch.rot90(x, k, dims=(-2, -1))`` and equal to it for odd H and W. Exact
    (a permutation of pixels); commutes with ``fftc``. ``k`` odd needs H == W (``ValueError`` naming
    the size); any ``k`` is taken mod 4.
    """
    if x.dim() < 2:
        raise ValueError(f"x: expected an image tensor (..., H, W), got shape {tuple(x.shape)}")
    k = int(k) % 4
    check_rotations((k,), x.shape[-2], x.shape[-1])
    if k == 0:
        return x
    if k == 2:
        return _centre_flip(_centre_flip(x, -2), -1)
    # R x = transpose of the centred flip along W: (R x)[u, v] = x[v, -u]; R^3 = R R^2.
    quarter = _centre_flip(x if k == 1 else rotate(x, 2), -1).transpose(-2, -1)
    return quarter.contiguous()


def rotate_physics(physics: nn.Module, k: int) -> nn.Module:
    """The operator that measures ``rotate(x, k)`` as ``physics`` measures x, for equivariant imaging.

    Parameters that belong to the object's frame rotate with it: the coil maps ``(B, C, H, W)`` of
    ``MultiCoilMRI`` (any physics with a non-``None`` ``coil_maps`` and ``update(coil_maps=...)``).
    The sampling itself does not: the mask, a blur kernel and decimation grid, block-CS blocks and
    matrix stay as they are, so the rotated image is measured by the same acquisition. Returns a
    shallow copy with the rotated maps (``physics`` is not modified), or ``physics`` itself when
    nothing rotates (``k % 4 == 0``, single-coil MRI, super-resolution, block CS).
    """
    maps = getattr(physics, "coil_maps", None)
    if k % 4 == 0 or maps is None:
        return physics
    rotated = copy.copy(physics)
    rotated.update(coil_maps=rotate(maps, k))
    return rotated
