"""Fused Triton kernel of the single-coil Cartesian MRI prox: one pointwise k-space pass between two FFTs.

    prox(z, y, g) = argmin_x g/2 ||M F_c x - y||² + 1/2 ||x - z||² = F_c^H [(F_c z + g M y) / (1 + g M²)]

with fastMRI's centred orthonormal F_c = fftshift ∘ F ∘ ifftshift. Per axis, with a = N // 2,
F ∘ ifftshift = diag(e^{+2πi k a / N}) F and fftshift ∘ F⁻¹ = F⁻¹ diag(e^{-2πi k a / N}); the two phases cancel on
the z term, so with Z = F(z) (unnormalised) and k' = (k + a) mod N:

    FFT     : Z = F(z)                                                            (torch.fft, reads z once)
    update  : W = (Z / N + g m(k') φ(k) y(k') / √N) / (1 + g m(k')²),  φ(k) = e^{-2πi k a / N}   in place
    iFFT    : x = F⁻¹(W), unnormalised                                            (torch.fft, writes x once)

φ is (-1)^k on an even axis (the sign flip of ``mbdl_fast.fft``) and a twiddle on an odd one; only y and the mask are
read rolled. No pass over the image before or after the FFTs. The CUDA twin is csrc/mri_prox/kspace_prox.cu.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from mbdl_fast.kernels.mri_dc import _block, _load_complex, _mask_strides, _pixels, _store_complex


@triton.jit
def _axis_phase(k, n, ODD: tl.constexpr):
    """e^{-2πi k (n // 2) / n}: exactly (-1)^k on an even axis; on an odd one the angle is reduced in integers first."""
    if ODD:
        r = (k.to(tl.int64) * (n // 2)) % n
        r = tl.where(2 * r > n, r - n, r)  # (-n/2, n/2): the angle lies in (-pi, pi)
        angle = (r.to(tl.float32) / n) * (-6.283185307179586)
        return tl.cos(angle), tl.sin(angle)
    else:
        return 1.0 - 2.0 * (k % 2).to(tl.float32), tl.zeros(k.shape, tl.float32)


@triton.jit
def _kspace_prox_kernel(
    z_ptr, mask_ptr, y_ptr, gamma_ptr, H, W, mask_sb, mask_sh, mask_sw, z_scale, y_scale,
    ODD_H: tl.constexpr, ODD_W: tl.constexpr, HAS_Y: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """In place on Z = F(z) (B, H, W): Z <- (z_scale Z + g m y_scale φ y') / (1 + g m²), y' and m read rolled."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    o, valid, i, j = _pixels(pid_p, H, W, BLOCK)
    ri = (i + H // 2) % H
    rj = (j + W // 2) % W
    m = tl.load(mask_ptr + b * mask_sb + ri * mask_sh + rj * mask_sw, mask=valid, other=0.0)
    gm = tl.load(gamma_ptr + b) * m
    d = 1.0 / (1.0 + gm * m)
    base = b * H * W * 2
    zr, zi = _load_complex(z_ptr + base, o, valid)
    outr = zr * z_scale
    outi = zi * z_scale
    if HAS_Y:
        yr, yi = _load_complex(y_ptr + base, ri * W + rj, valid)
        hr, hi = _axis_phase(i, H, ODD_H)
        wr, wi = _axis_phase(j, W, ODD_W)
        pr = hr * wr - hi * wi
        pi = hr * wi + hi * wr
        f = gm * y_scale
        outr += f * (pr * yr - pi * yi)
        outi += f * (pr * yi + pi * yr)
    _store_complex(z_ptr + base, o, outr * d, outi * d, valid)


# ------------------------------------------------------------------------------------------------
# Launchers. Arguments are checked by the caller (the physics); here they are contiguous complex64.
# ------------------------------------------------------------------------------------------------
def kspace_prox_triton(z_k: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor) -> None:
    """In place on z_k = F(z) (B, H, W) complex64, unnormalised: the prox's k-space step (module docstring).

    mask: float32 (B|1, 1, H|1, W|1); y: contiguous complex64 (B, 1, H, W) or None (y = 0); gamma: float32 (B,).
    """
    b, h, w = z_k.shape
    block = _block(z_k.device)
    sb, sh, sw = _mask_strides(mask)
    zr = torch.view_as_real(z_k)
    _kspace_prox_kernel[(triton.cdiv(h * w, block), b)](
        zr, mask, torch.view_as_real(y) if y is not None else zr, gamma, h, w, sb, sh, sw,
        1.0 / (h * w), 1.0 / math.sqrt(h * w),
        ODD_H=h % 2 == 1, ODD_W=w % 2 == 1, HAS_Y=y is not None, BLOCK=block,
    )  # fmt: skip


def mri_prox_l2_triton(
    z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor
) -> torch.Tensor:
    """The ``triton`` implementation of ``mbdl_fast.ops.mri_prox.mri_prox_l2_op`` (its docstring: the arguments):
    F_c^H [(F_c z + g M y) / (1 + g M²)] as FFT, one fused k-space pass, inverse FFT."""
    z_k = torch.fft.fft2(z, norm="backward").contiguous()
    kspace_prox_triton(z_k, mask, y, gamma)
    return torch.fft.ifft2(z_k, norm="forward")
