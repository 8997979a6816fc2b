"""``prox_l2``: the data-consistency prox argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||², three backends, one call.

It solves (I + gamma A^H A) x = z + gamma A^H y. For Cartesian MRI:

- single coil (no coil maps), the fused backends (``triton``, ``cuda``) run the closed form
  x = F_c^H [(F_c z + gamma M y) / (1 + gamma M²)] as one FFT of z, ONE fused pointwise k-space pass
  (kernels/mri_prox.py, csrc/kspace_prox.cu) and one inverse FFT that writes x: the centring shifts and the
  1/N, 1/√N scales are folded into that pass (the shift phases cancel on the z term, so only y and the mask are
  read rolled), z is read once and x written once. A torch custom op ``mbdl_fast::mri_prox_l2`` with autograd and
  a fake implementation. The map is linear in z and y, so its backward is the same prox structure:

      dL/dz     = F_c^H [F_c g / (1 + gamma M²)]             (the same fused op, y = 0)
      dL/dy     = gamma M F_c g / (1 + gamma M²)
      dL/dgamma = Re <F_c g, M (y - M F_c x) / (1 + gamma M²)>   per sample

  with g = dL/dx (PyTorch's conjugate-Wirtinger convention for complex tensors).
- multi-coil, CG (``mbdl_fast.linalg.solve_hpd``, per-sample convergence, warm start at z, the
  operator's ``cg_tol`` and ``cg_max_iter``) whose normal operator is the fused DC step of the same backend with
  y = 0 and step -gamma: dc_step(v, 0, -gamma) = v + gamma A^H A v = (I + gamma A^H A) v, one fused op per
  iteration, transforming only the axes the mask varies along; the right-hand side's gamma A^H y is one fused
  step at x = 0. Differentiable implicitly, as the torch reference: the backward is one more CG solve, and the
  gradients of gamma and y follow the DC step's autograd through r = rhs - (I + gamma A^H A) x at the solution.

Other operators (super-resolution, block CS) run their own ``prox_l2``.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import check_finite, check_operator, check_step, check_tensor, describe, run_unchecked
from mbdl_fast.backends import resolve_backend
from mbdl_fast.dc import _FUSED, _checks_wanted, _gamma_vector, mri_dc_step_op


# ------------------------------------------------------------------------------------------------
# Custom op: the single-coil closed form
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mbdl_fast::mri_prox_l2", mutates_args=())
def mri_prox_l2_op(
    z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, gamma: torch.Tensor, impl: str
) -> torch.Tensor:
    """F_c^H [(F_c z + gamma M y) / (1 + gamma M²)], single coil.

    z: contiguous complex64 (B, H, W); mask float32 (B|1, 1, H|1, W|1); y contiguous complex64 (B, 1, H, W) or
    None (y = 0); gamma float32 (B,); impl "triton" | "cuda". The kernels index z, y and gamma densely.
    """
    z, gamma = z.contiguous(), gamma.to(torch.float32).contiguous()
    y = y.contiguous() if y is not None else None
    if impl == "triton":
        from mbdl_fast.kernels.mri_prox import mri_prox_l2_triton

        return mri_prox_l2_triton(z, mask, y, gamma)
    if impl == "cuda":
        from mbdl_fast._extension import mri_prox_l2_cuda

        return mri_prox_l2_cuda(z, mask, y, gamma)
    raise ValueError(f"impl: expected 'triton' or 'cuda', got {impl!r}")


@mri_prox_l2_op.register_fake
def _(z, mask, y, gamma, impl):
    return z.new_empty(z.shape)  # contiguous, as the inverse FFT's output


def _fft2c(x: torch.Tensor) -> torch.Tensor:
    """fastMRI's centred orthonormal FFT with plain rolls (no cached sign tables: traced with fake tensors too)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def _prox_setup(ctx, inputs, output):
    z, mask, y, gamma, impl = inputs
    ctx.save_for_backward(mask, y, gamma, output)
    ctx.impl = impl


def _prox_backward(ctx, grad):
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


mri_prox_l2_op.register_autograd(_prox_backward, setup_context=_prox_setup)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def prox_l2(
    physics: torch.nn.Module,
    z: torch.Tensor,
    y: torch.Tensor,
    gamma: float | torch.Tensor,
    backend: str = "auto",
    check_inputs: bool = True,
) -> torch.Tensor:
    """argmin_x gamma/2 ||A x - y||² + 1/2 ||x - z||² for ``physics``, by ``backend`` ("auto", "torch", "triton", "cuda").

    Args:
        physics: a ``mbdl_fast.physics`` operator. Cartesian MRI (``MRI``, ``MultiCoilMRI``) has the fused backends:
            single coil, the closed form in one fused k-space pass between two FFTs; multi-coil, CG (the operator's
            ``cg_tol``, ``cg_max_iter``; info in ``physics.last_prox_info``) on the fused DC step.
        z: the point to pull towards, e.g. complex64 (B, H, W) for MRI (complex64 for the fused backends).
        y: measurements, e.g. complex64 (B, C, H, W) k-space.
        gamma: step, a float or a real tensor of shape () or (B,), >= 0; differentiable.
        backend: "torch" is the operator's own method (``prox_l2_reference`` for MRI), exactly. "auto" picks the
            fastest available fused backend and uses "torch" where the fused ones cannot run the call (complex128,
            an operator whose coil maps or mask require grad); an explicit fused backend refuses such a call.
        check_inputs: refuse NaN/Inf in z, y and gamma and a negative gamma (a GPU synchronisation).
    """
    from mbdl_fast.physics.mri import MultiCoilMRI

    check_operator("physics", physics, ("prox_l2",))
    z = check_tensor("z", z)
    if y is None:
        raise ValueError("y: expected measurements, got None")
    y = check_tensor("y", y)
    is_mri = isinstance(physics, MultiCoilMRI)
    supported = ("torch",) + (_FUSED if is_mri else ())
    name = resolve_backend(backend, z.device, supported)
    checks = _checks_wanted(check_inputs)
    check_step("gamma", gamma, z.shape[0] if z.dim() else 1, checks)
    if checks:
        for arg, t in (("z", z), ("y", y)):
            check_finite(arg, t)
    # Checked once here: the operator's own NaN scans would repeat these.
    if not is_mri:
        return run_unchecked(physics.prox_l2, z, y, gamma)
    return run_unchecked(_mri_prox_l2, physics, z, y, gamma, name, backend == "auto")


def _fused_refusal(physics, img: torch.Tensor, ky: torch.Tensor, backend: str) -> Exception | None:
    """Why ``backend`` cannot run this call (an exception to raise), or None."""
    if img.dtype != torch.complex64:
        return TypeError(f"z: backend {backend!r} expects complex64 (B, H, W), got {describe(img)}")
    if ky.dtype != torch.complex64:
        return TypeError(f"y: backend {backend!r} expects complex64 (B, C, H, W), got {describe(ky)}")
    for arg, t in (("coil_maps", physics.coil_maps), ("mask", physics.mask)):
        if t is not None and t.requires_grad:
            return ValueError(f"{arg}: backend {backend!r} does not differentiate the operator; use backend='torch'")
    return None


def _mri_prox_l2(physics, z, y, gamma, backend: str, auto: bool) -> torch.Tensor:
    img, channel = physics._image_in("z", z)
    ky = physics._kspace_in("y", y, img)
    if backend != "torch":
        refusal = _fused_refusal(physics, img, ky, backend)
        if refusal is not None:
            if not auto:
                raise refusal
            backend = "torch"
    if backend == "torch":
        return physics.prox_l2_reference(z, y, gamma)
    b, h, w = img.shape
    g = _gamma_vector(gamma, b, img.device).contiguous()
    img = img.contiguous()
    if physics.coil_maps is None:
        out = mri_prox_l2_op(img, physics.mask_for(img), ky.contiguous(), g, backend)
        return physics._image_out(out, channel)
    coil_maps = physics.coil_maps.contiguous()
    mask = physics.mask_for(img)
    dims = physics.transform_dims(h, w)
    th, tw = -2 in dims, -1 in dims
    # gamma A^H y: one fused step x - gamma (A^H A x - A^H y) at x = 0 (both axes transformed: y is given).
    rhs = img + mri_dc_step_op(torch.zeros_like(img), coil_maps, mask, ky.contiguous(), None, g, True, True, backend)
    minus_g = -g

    def normal(v: torch.Tensor) -> torch.Tensor:  # (I + gamma A^H A) v = dc_step(v, y = 0, -gamma)
        return mri_dc_step_op(v.contiguous(), coil_maps, mask, None, None, minus_g, th, tw, backend)

    from mbdl_fast.linalg import solve_hpd

    x, info = solve_hpd(
        normal, rhs, x0=img, tol=physics.cg_tol, max_iter=physics.cg_max_iter, warn_as=f"prox_l2 ({backend})"
    )
    physics.last_prox_info = info
    return physics._image_out(x, channel)
