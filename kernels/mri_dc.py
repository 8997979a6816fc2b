"""Fused Triton kernels for the Cartesian MRI operators, everything between the FFTs.

One DC step x' = x - gamma A^H(A x - y), A = M F_c S, runs as

    expand  : z  = s ⊙ (S_c ⊙ x)                         (B, H, W) -> (B, C, H, W)   [shift folded in]
    FFT     : Z  = F(z)                                  (torch.fft, unnormalised)
    update  : W  = M ⊙ (M ⊙ Z / N - c s ⊙ y / √N)        in place; or W = M² Z / N with A^H y given
    iFFT    : U  = F^{-1}(W)                             (torch.fft, unnormalised)
    combine : x' = x - gamma (s ⊙ Σ_c conj(S_c) U_c [- A^H y])

For an even axis length the centring shifts are the signs s = (-1)^i and c = (-1)^(N/2)
(``mbdl_fast.fft``); for an odd length they are index rolls folded into the loads. Axes the mask
does not vary along are not transformed at all (mode 0). The two unnormalised FFTs and the 1/N,
1/√N factors here equal the orthonormal transforms exactly.

Complex tensors are read as interleaved float32 pairs ((..., 2) views), two at a time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mbdl_fast.fft import centre_sign

# Per-axis centring mode, a constexpr of every kernel.
AXIS_UNTOUCHED, AXIS_EVEN, AXIS_ODD = 0, 1, 2
# What the k-space kernel writes.
KSPACE_RESIDUAL, KSPACE_NORMAL, KSPACE_FORWARD = 0, 1, 2


@triton.jit
def _load_complex(ptr, idx, valid):
    pair = tl.arange(0, 2)
    v = tl.load(ptr + idx[:, None] * 2 + pair[None, :], mask=valid[:, None], other=0.0)
    return tl.split(v)


@triton.jit
def _store_complex(ptr, idx, re, im, valid):
    pair = tl.arange(0, 2)
    tl.store(ptr + idx[:, None] * 2 + pair[None, :], tl.join(re, im), mask=valid[:, None])


@triton.jit
def _axis_sign(i, MODE: tl.constexpr):
    """(-1)^i on an even transformed axis, 1 otherwise."""
    if MODE == 1:
        return 1.0 - 2.0 * (i % 2).to(tl.float32)
    else:
        return tl.full(i.shape, 1.0, tl.float32)


@triton.jit
def _roll(i, n, shift, MODE: tl.constexpr):
    """(i + shift) mod n on an odd transformed axis, i otherwise."""
    if MODE == 2:
        return (i + shift) % n
    else:
        return i


@triton.jit
def _pixels(pid, H, W, BLOCK: tl.constexpr):
    """The BLOCK flat pixel indices of program ``pid``, their validity, row and column."""
    p = pid * BLOCK + tl.arange(0, BLOCK)
    return p, p < H * W, p // W, p % W


@triton.jit
def _coil_expand_kernel(
    x_ptr, s_ptr, z_ptr, C, H, W, s_batch_stride,
    MODE_H: tl.constexpr, MODE_W: tl.constexpr, HAS_COILS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """z[b, c] = s ⊙ S[b, c] ⊙ x[b], read at ifftshifted positions on odd axes."""
    pid_p = tl.program_id(0)
    bc = tl.program_id(1)
    b = bc // C
    p, valid, i, j = _pixels(pid_p, H, W, BLOCK)
    src = _roll(i, H, H // 2, MODE_H) * W + _roll(j, W, W // 2, MODE_W)
    sign = _axis_sign(i, MODE_H) * _axis_sign(j, MODE_W)
    xr, xi = _load_complex(x_ptr + b.to(tl.int64) * H * W * 2, src, valid)
    if HAS_COILS:
        c = bc % C
        sr, si = _load_complex(s_ptr + (b.to(tl.int64) * s_batch_stride + c * H * W) * 2, src, valid)
        zr = (sr * xr - si * xi) * sign
        zi = (sr * xi + si * xr) * sign
    else:
        zr = xr * sign
        zi = xi * sign
    _store_complex(z_ptr + bc.to(tl.int64) * H * W * 2, p, zr, zi, valid)


@triton.jit
def _kspace_update_kernel(
    z_ptr, mask_ptr, y_ptr, out_ptr, C, H, W, mask_sb, mask_sh, mask_sw, z_scale, y_scale, c_sign,
    MODE_H: tl.constexpr, MODE_W: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """K-space update between the FFTs.

    OUT = 0 (residual): out = M (M Z z_scale - c s y y_scale), mask and y read ifftshifted;
    OUT = 1 (normal):   out = M² Z z_scale;
    OUT = 2 (forward):  out = M K, K = c s Z z_scale read fftshifted (natural k-space order).
    """
    pid_p = tl.program_id(0)
    bc = tl.program_id(1)
    b = bc // C
    o, valid, i, j = _pixels(pid_p, H, W, BLOCK)
    sign = _axis_sign(i, MODE_H) * _axis_sign(j, MODE_W)
    base = bc.to(tl.int64) * H * W * 2
    if OUT == 2:
        # fftshift on odd axes: K[k] = Z[(k - n//2) mod n] = Z[(k + n - n//2) mod n]
        zidx = _roll(i, H, H - H // 2, MODE_H) * W + _roll(j, W, W - W // 2, MODE_W)
        mi = i
        mj = j
    else:
        zidx = o
        mi = _roll(i, H, H // 2, MODE_H)
        mj = _roll(j, W, W // 2, MODE_W)
    m = tl.load(mask_ptr + b * mask_sb + mi * mask_sh + mj * mask_sw, mask=valid, other=0.0)
    zr, zi = _load_complex(z_ptr + base, zidx, valid)
    if OUT == 0:
        yr, yi = _load_complex(y_ptr + base, mi * W + mj, valid)
        ys = sign * c_sign * y_scale
        outr = m * (m * zr * z_scale - ys * yr)
        outi = m * (m * zi * z_scale - ys * yi)
    elif OUT == 1:
        outr = m * m * zr * z_scale
        outi = m * m * zi * z_scale
    else:
        f = m * sign * c_sign * z_scale
        outr = f * zr
        outi = f * zi
    _store_complex(out_ptr + base, o, outr, outi, valid)


@triton.jit
def _coil_combine_kernel(
    u_ptr, s_ptr, x_ptr, ahy_ptr, gamma_ptr, out_ptr, H, W, s_batch_stride, C: tl.constexpr,
    MODE_H: tl.constexpr, MODE_W: tl.constexpr, HAS_COILS: tl.constexpr, HAS_AHY: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[b] = x[b] - gamma[b] (s ⊙ Σ_c conj(S[b, c]) U[b, c] - A^H y[b]), U read fftshifted on odd axes."""
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    o, valid, i, j = _pixels(pid_p, H, W, BLOCK)
    uidx = _roll(i, H, H - H // 2, MODE_H) * W + _roll(j, W, W - W // 2, MODE_W)
    accr = tl.zeros((BLOCK,), tl.float32)
    acci = tl.zeros((BLOCK,), tl.float32)
    for c in range(C):  # C is a constexpr: one compilation per coil count, unrolled
        ur, ui = _load_complex(u_ptr + (b * C + c) * H * W * 2, uidx, valid)
        if HAS_COILS:
            sr, si = _load_complex(s_ptr + (b * s_batch_stride + c * H * W) * 2, o, valid)
            accr += sr * ur + si * ui
            acci += sr * ui - si * ur
        else:
            accr += ur
            acci += ui
    sign = _axis_sign(i, MODE_H) * _axis_sign(j, MODE_W)
    accr = accr * sign
    acci = acci * sign
    if HAS_AHY:
        ar, ai = _load_complex(ahy_ptr + b * H * W * 2, o, valid)
        accr -= ar
        acci -= ai
    g = tl.load(gamma_ptr + b)
    xr, xi = _load_complex(x_ptr + b * H * W * 2, o, valid)
    _store_complex(out_ptr + b * H * W * 2, o, xr - g * accr, xi - g * acci, valid)


# ------------------------------------------------------------------------------------------------
# Launchers. Arguments are checked by the caller (the physics); here they are contiguous complex64.
# ------------------------------------------------------------------------------------------------
def _block(device: torch.device) -> int:
    # The interpreter runs one Python call per program: big blocks keep it tolerable.
    return 1024 if device.type == "cuda" else 4096


def _axis_modes(shape: tuple[int, int], dims: tuple[int, ...]) -> tuple[int, int]:
    h, w = shape
    mode_h = AXIS_UNTOUCHED if -2 not in dims else (AXIS_EVEN if h % 2 == 0 else AXIS_ODD)
    mode_w = AXIS_UNTOUCHED if -1 not in dims else (AXIS_EVEN if w % 2 == 0 else AXIS_ODD)
    return mode_h, mode_w


def _mask_strides(mask: torch.Tensor) -> tuple[int, int, int]:
    """Element strides (batch, h, w) of a (B|1, 1, H|1, W|1) mask, 0 on broadcast axes."""
    sb, _, sh, sw = (0 if n == 1 else s for n, s in zip(mask.shape, mask.stride(), strict=True))
    return sb, sh, sw


def _expand_fft(x: torch.Tensor, coil_maps: torch.Tensor | None, num_coils: int, dims: tuple[int, ...]):
    b, h, w = x.shape
    mode_h, mode_w = _axis_modes((h, w), dims)
    z = torch.empty((b, num_coils, h, w), dtype=torch.complex64, device=x.device)
    block = _block(x.device)
    grid = (triton.cdiv(h * w, block), b * num_coils)
    s = coil_maps if coil_maps is not None else x
    s_batch_stride = 0 if coil_maps is None or coil_maps.shape[0] == 1 else num_coils * h * w
    _coil_expand_kernel[grid](
        torch.view_as_real(x), torch.view_as_real(s), torch.view_as_real(z), num_coils, h, w, s_batch_stride,
        MODE_H=mode_h, MODE_W=mode_w, HAS_COILS=coil_maps is not None, BLOCK=block,
    )  # fmt: skip
    # torch may return a transform along H with permuted strides; the kernels index contiguously.
    return torch.fft.fftn(z, dim=dims, norm="backward").contiguous(), (mode_h, mode_w), grid, block


def mri_dc_step_triton(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w) -> torch.Tensor:
    """The ``triton`` implementation of ``mbdl_fast.ops.dc_step.mri_dc_step_op`` (its docstring: the arguments):
    x - gamma (A^H A x - A^H y) with A^H y from ``y`` (both axes transformed) or given as ``ahy``."""
    dims = tuple(d for d, on in ((-2, transform_h), (-1, transform_w)) if on)
    b, h, w = x.shape
    num_coils = 1 if coil_maps is None else coil_maps.shape[1]
    z, (mode_h, mode_w), grid, block = _expand_fft(x, coil_maps, num_coils, dims)
    n = math.prod((h, w)[d] for d in dims)
    sb, sh, sw = _mask_strides(mask)
    out_mode = KSPACE_RESIDUAL if y is not None else KSPACE_NORMAL
    zr = torch.view_as_real(z)
    _kspace_update_kernel[grid](
        zr, mask, torch.view_as_real(y) if y is not None else zr, zr, num_coils, h, w, sb, sh, sw,
        1.0 / n, 1.0 / math.sqrt(n), centre_sign((h, w), dims),
        MODE_H=mode_h, MODE_W=mode_w, OUT=out_mode, BLOCK=block,
    )  # fmt: skip
    u = torch.fft.ifftn(z, dim=dims, norm="forward").contiguous()
    out = torch.empty_like(x)
    s = coil_maps if coil_maps is not None else x
    s_batch_stride = 0 if coil_maps is None or coil_maps.shape[0] == 1 else num_coils * h * w
    _coil_combine_kernel[(grid[0], b)](
        torch.view_as_real(u), torch.view_as_real(s), torch.view_as_real(x),
        torch.view_as_real(ahy) if ahy is not None else torch.view_as_real(x), gamma, torch.view_as_real(out),
        h, w, s_batch_stride, C=num_coils,
        MODE_H=mode_h, MODE_W=mode_w, HAS_COILS=coil_maps is not None, HAS_AHY=ahy is not None, BLOCK=block,
    )  # fmt: skip
    return out


def mri_forward_triton(x: torch.Tensor, coil_maps: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """The ``triton`` implementation of ``mbdl_fast.ops.mri_forward.mri_forward_op``: A x = M ⊙ F_c(S ⊙ x),
    (B, H, W) complex64 -> (B, C, H, W) complex64, 2-D transform."""
    b, h, w = x.shape
    num_coils = 1 if coil_maps is None else coil_maps.shape[1]
    dims = (-2, -1)
    z, (mode_h, mode_w), grid, block = _expand_fft(x, coil_maps, num_coils, dims)
    out = torch.empty_like(z)
    sb, sh, sw = _mask_strides(mask)
    zr = torch.view_as_real(z)
    _kspace_update_kernel[grid](
        zr, mask, zr, torch.view_as_real(out), num_coils, h, w, sb, sh, sw,
        1.0 / math.sqrt(h * w), 0.0, centre_sign((h, w), dims),
        MODE_H=mode_h, MODE_W=mode_w, OUT=KSPACE_FORWARD, BLOCK=block,
    )  # fmt: skip
    return out
