"""``mri_prox_l2``: the single-coil Cartesian MRI prox in closed form, as one fused op.

    prox(z, y, gamma) = argmin_x gamma/2 ||M F_c x - y||² + 1/2 ||x - z||² = F_c^H [(F_c z + gamma M y) / (1 + gamma M²)]

    z: contiguous complex64 (B, H, W);  mask M: float32 (B|1, 1, H|1, W|1);
    y: contiguous complex64 (B, 1, H, W) or None (y = 0);  gamma: float32 (B,).

Every implementation takes ``(z, mask, y, gamma)``:

- ``torch``: :func:`mri_prox_l2_ref`, plain PyTorch, the definition;
- ``triton`` (kernels/mri_prox.py) and ``cuda`` (:func:`mri_prox_l2_cuda`, csrc/mri_prox/): one FFT of z, ONE fused
  pointwise k-space pass (:func:`kspace_prox_update_ref` states its maths) and one inverse FFT that writes x: the
  centring shifts and the 1/N, 1/√N scales are folded into that pass (the shift phases cancel on the z term, so only
  y and the mask are read rolled), z is read once and x written once.

The op (``mbdl_fast::mri_prox_l2``) has autograd and a fake implementation. The map is linear in z and y, so its
backward is the same prox structure:

    dL/dz     = F_c^H [F_c g / (1 + gamma M²)]                 (the same fused op, y = 0)
    dL/dy     = gamma M F_c g / (1 + gamma M²)
    dL/dgamma = Re <F_c g, M (y - M F_c x) / (1 + gamma M²)>   per sample

with g = dL/dx (PyTorch's conjugate-Wirtinger convention for complex tensors). The multi-coil prox has no closed
form: ``MultiCoilMRI.prox_l2`` runs CG on the fused DC step (mbdl_fast.ops.dc_step).
"""

from __future__ import annotations

import torch

from mbdl_fast import cuda_extension
from mbdl_fast._validate import describe
from mbdl_fast.backends import implementation, register
from mbdl_fast.cuda_extension import check_mask, contiguous, expected, mask_strides
from mbdl_fast.fft import fftc, ifftc

OP = "mri_prox_l2"


@torch.library.custom_op("mbdl_fast::mri_prox_l2", mutates_args=())
def mri_prox_l2_op(
    z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor, impl: str
) -> torch.Tensor:
    """F_c^H [(F_c z + gamma M y) / (1 + gamma M²)] by backend ``impl`` (module docstring: the arguments and their
    shapes). The kernels index z, y and gamma densely."""
    z, gamma = z.contiguous(), gamma.to(torch.float32).contiguous()
    y = y.contiguous() if y is not None else None
    return implementation(OP, impl)(z, mask, y, gamma)


@mri_prox_l2_op.register_fake
def _(z, mask, y, gamma, impl):
    return z.new_empty(z.shape)  # contiguous, as the inverse FFT's output


def mri_prox_l2_ref(
    z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor | float
) -> torch.Tensor:
    """F_c^H [(F_c z + gamma M y) / (1 + gamma M²)] in plain PyTorch (arguments: module docstring; any complex dtype,
    gamma also a float or any tensor viewable as (B, 1, 1, 1)): the definition the fused implementations are checked
    against."""
    g = gamma.to(z.real.dtype).reshape(-1, 1, 1, 1) if isinstance(gamma, torch.Tensor) else gamma
    num = fftc(z.unsqueeze(1))
    if y is not None:
        num = num + g * mask * y
    return ifftc(num / (1 + g * mask * mask))[:, 0]


def _fft2c(x: torch.Tensor) -> torch.Tensor:
    """fastMRI's centred orthonormal FFT with plain rolls (no cached sign tables: traced with fake tensors too)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def _setup(ctx, inputs, output):
    z, mask, y, gamma, impl = inputs
    ctx.save_for_backward(mask, y, gamma, output)
    ctx.impl = impl


def _backward(ctx, grad):
    mask, y, gamma, x = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad = grad.contiguous()
    gz = gy = ggamma = None
    if needs[0]:
        gz = mri_prox_l2_op(grad, mask, None, gamma, ctx.impl)
    if (needs[2] and y is not None) or needs[3]:
        g = gamma.view(-1, 1, 1)
        m = mask[:, 0]
        weight = 1.0 / (1.0 + g * m * m)
        grad_k = _fft2c(grad)
        if needs[2] and y is not None:
            gy = (g * m * weight * grad_k).unsqueeze(1)
        if needs[3]:
            residual = -m * _fft2c(x) if y is None else y[:, 0] - m * _fft2c(x)
            ggamma = torch.sum((grad_k.conj() * (m * weight * residual)).real, dim=(1, 2))
    return gz, None, gy, ggamma, None


mri_prox_l2_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# The k-space pass between the FFTs: its maths, and the cuda implementation
# ------------------------------------------------------------------------------------------------
def _prox_phase(n: int, device: torch.device) -> torch.Tensor:
    """e^{-2 pi i k (n // 2) / n} for k in [0, n), complex128; (-1)^k when n is even."""
    r = (torch.arange(n, dtype=torch.int64, device=device) * (n // 2)) % n
    return torch.polar(torch.ones(n, dtype=torch.float64, device=device), -2 * torch.pi * r.to(torch.float64) / n)


def kspace_prox_update_ref(
    z_k: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor
) -> torch.Tensor:
    """Reference of the fused k-space prox step, out of place, on Z = F(z) (B, H, W) unnormalised:

        out[b, h, w] = (Z / N + g m' phi y' / sqrt(N)) / (1 + g m'^2),   N = H W,

    m', y' read at ((h + H // 2) mod H, (w + W // 2) mod W), phi = e^{-2 pi i (h (H//2) / H + w (W//2) / W)}.

    Why: per axis F o ifftshift = diag(e^{+2 pi i k a/N}) F and fftshift o F^{-1} = F^{-1} diag(e^{-2 pi i k a/N}),
    a = N // 2, so F_c^H [(F_c z + g M y) / (1 + g M^2)] = F^{-1}(out) with F^{-1} unnormalised: the phases cancel on
    the z term, z goes straight into the forward FFT and the inverse FFT writes x. mask: (B|1, 1, H|1, W|1) real;
    y: (B, 1, H, W) or None; gamma: (B,).
    """
    b, h, w = z_k.shape
    m = mask.to(z_k.real.dtype).expand(b, 1, h, w)[:, 0]
    m = torch.roll(m, shifts=(-(h // 2), -(w // 2)), dims=(-2, -1))
    g = gamma.to(z_k.real.dtype).view(-1, 1, 1)
    num = z_k / (h * w)
    if y is not None:
        phase = _prox_phase(h, z_k.device)[:, None] * _prox_phase(w, z_k.device)[None, :]
        y_rolled = torch.roll(y[:, 0], shifts=(-(h // 2), -(w // 2)), dims=(-2, -1))
        num = num + g * m * phase.to(z_k.dtype) * y_rolled / (h * w) ** 0.5
    return num / (1 + g * m * m)


def kspace_prox_update_cuda(z_k: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor) -> None:
    """In place on z_k, with the CUDA kernel: the prox's k-space step (maths in :func:`kspace_prox_update_ref`).

    z_k: contiguous complex64 (B, H, W) on cuda (the unnormalised FFT of z); mask: float32 (B|1, 1, H|1, W|1), any
    strides; y: None or contiguous complex64 (B, 1, H, W); gamma: contiguous float32 (B,). Runs on the current
    stream; no autograd (the op's).
    """
    z_expected = "contiguous complex64 (B, H, W) on cuda"
    z_k = contiguous(z_k, torch.complex64, lambda t: t.dim() == 3, z_expected, "z_k")
    B, H, W = z_k.shape
    check_mask(mask, B, H, W)
    if y is not None:
        y = contiguous(
            y,
            torch.complex64,
            lambda t: tuple(t.shape) == (B, 1, H, W),
            f"None or contiguous complex64 {(B, 1, H, W)}",
            "y",
        )
    gamma = contiguous(gamma, torch.float32, lambda t: tuple(t.shape) == (B,), f"contiguous float32 ({B},)", "gamma")
    # Devices last, so that the checks above also run (and are tested) on CPU tensors.
    if not z_k.is_cuda:
        raise expected("z_k", z_expected, z_k)
    for name, t in (("mask", mask), ("y", y), ("gamma", gamma)):
        if t is not None and t.device != z_k.device:
            raise ValueError(f"{name}: expected a tensor on {z_k.device} (like z_k), got {describe(t)}")
    ext = cuda_extension.require()
    sb, sh, sw = mask_strides(mask)
    with torch.cuda.device(z_k.device):
        ext.kspace_prox_update(
            z_k.data_ptr(),
            mask.data_ptr(),
            0 if y is None else y.data_ptr(),
            gamma.data_ptr(),
            B,
            H,
            W,
            sb,
            sh,
            sw,
            1.0 / (H * W),
            1.0 / (H * W) ** 0.5,
            torch.cuda.current_stream(z_k.device).cuda_stream,
        )


def mri_prox_l2_cuda(z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor) -> torch.Tensor:
    """The ``cuda`` implementation of :func:`mri_prox_l2_op`: cuFFT (torch.fft), the fused k-space kernel
    (csrc/mri_prox/kspace_prox.cu) in place, inverse cuFFT. z: contiguous complex64 (B, H, W) on cuda."""
    z = contiguous(z, torch.complex64, lambda t: t.dim() == 3, "contiguous complex64 (B, H, W) on cuda", "z")
    if not z.is_cuda:
        raise expected("z", "contiguous complex64 (B, H, W) on cuda", z)
    z_k = torch.fft.fft2(z, norm="backward").contiguous()
    kspace_prox_update_cuda(z_k, mask, y, gamma)
    return torch.fft.ifft2(z_k, norm="forward")


register(OP, "torch", mri_prox_l2_ref)
register(OP, "triton", "mbdl_fast.kernels.mri_prox:mri_prox_l2_triton")
register(OP, "cuda", mri_prox_l2_cuda)
