"""``dc_step``: the data-consistency gradient step x' = x - gamma A^H(A x - y), three backends, one call.

For Cartesian MRI the fused backends (``triton``, ``cuda``) run as torch custom ops
(``mbdl_fast::mri_dc_step``) with autograd and a fake implementation, so ``torch.compile`` traces
around them. The step is affine in x and y and linear in gamma, so its backward is the same kind
of step:

    dL/dx     = g - gamma A^H A g          (the same fused kernel, without y)
    dL/dy     = gamma A g                  (the fused forward operator)
    dL/dA^H y = gamma g
    dL/dgamma = -Re <g, A^H A x - A^H y>   per sample

with g = dL/dx' (PyTorch's conjugate-Wirtinger convention for complex tensors).
Other operators (super-resolution, block CS) run their plain PyTorch ``dc_step_reference``.
"""

from __future__ import annotations

import torch

from mbdl_fast._validate import (
    check_complex,
    check_finite,
    check_operator,
    check_same_device,
    check_step,
    check_tensor,
    describe,
    run_unchecked,
    value_checks_wanted,
)
from mbdl_fast.backends import resolve_backend

_FUSED = ("triton", "cuda")


def _dims(transform_h: bool, transform_w: bool) -> tuple[int, ...]:
    return tuple(d for d, on in ((-2, transform_h), (-1, transform_w)) if on)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mbdl_fast::mri_dc_step", mutates_args=())
def mri_dc_step_op(
    x: torch.Tensor,
    coil_maps: torch.Tensor | None,
    mask: torch.Tensor,
    y: torch.Tensor | None,
    ahy: torch.Tensor | None,
    gamma: torch.Tensor,
    transform_h: bool,
    transform_w: bool,
    impl: str,
) -> torch.Tensor:
    """x - gamma (A^H A x - A^H y), A^H y from ``y`` (then both axes are transformed) or given as ``ahy``.

    x, ahy: (B, H, W) complex64; coil_maps (B|1, C, H, W) complex64 or None; mask float32
    (B|1, 1, H|1, W|1); y (B, C, H, W) complex64 or None; gamma float32 (B,); impl "triton" | "cuda".
    """
    dims = _dims(transform_h, transform_w)
    if impl == "triton":
        from mbdl_fast.kernels.mri_dc import mri_dc_step_triton

        return mri_dc_step_triton(x, coil_maps, mask, y, ahy, gamma, dims)
    if impl == "cuda":
        return _mri_dc_step_cuda(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w)
    raise ValueError(f"impl: expected 'triton' or 'cuda', got {impl!r}")


@mri_dc_step_op.register_fake
def _(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w, impl):
    return torch.empty_like(x)


@torch.library.custom_op("mbdl_fast::mri_forward", mutates_args=())
def mri_forward_op(x: torch.Tensor, coil_maps: torch.Tensor | None, mask: torch.Tensor, impl: str) -> torch.Tensor:
    """A x = M ⊙ F_c(S ⊙ x): (B, H, W) complex64 -> (B, C, H, W) complex64 (fused expand + FFT + mask)."""
    if impl == "triton":
        from mbdl_fast.kernels.mri_dc import mri_forward_triton

        return mri_forward_triton(x, coil_maps, mask)
    from mbdl_fast.fft import fft2c

    expanded = x.unsqueeze(1) if coil_maps is None else coil_maps * x.unsqueeze(1)
    return mask * fft2c(expanded)


@mri_forward_op.register_fake
def _(x, coil_maps, mask, impl):
    c = 1 if coil_maps is None else coil_maps.shape[1]
    return x.new_empty((x.shape[0], c, x.shape[1], x.shape[2]))


def _forward_setup(ctx, inputs, output):
    _, coil_maps, mask, _ = inputs
    ctx.save_for_backward(coil_maps, mask)


def _forward_backward(ctx, grad):
    from mbdl_fast.fft import ifft2c

    coil_maps, mask = ctx.saved_tensors
    z = ifft2c(mask * grad)
    gx = z[:, 0] if coil_maps is None else torch.sum(coil_maps.conj() * z, dim=1)
    return gx, None, None, None


mri_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)


def _dc_setup(ctx, inputs, output):
    x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w, impl = inputs
    ctx.save_for_backward(x, coil_maps, mask, y, ahy, gamma)
    ctx.flags = (transform_h, transform_w, impl)


def _dc_backward(ctx, grad):
    x, coil_maps, mask, y, ahy, gamma = ctx.saved_tensors
    transform_h, transform_w, impl = ctx.flags
    needs = ctx.needs_input_grad
    grad = grad.contiguous()
    gx = gy = gahy = ggamma = None
    g_view = gamma.view(-1, 1, 1)
    if needs[0]:
        gx = mri_dc_step_op(grad, coil_maps, mask, None, None, gamma, transform_h, transform_w, impl)
    if needs[3] and y is not None:
        gy = g_view.unsqueeze(1) * mri_forward_op(grad, coil_maps, mask, impl)
    if needs[4] and ahy is not None:
        gahy = g_view * grad
    if needs[5]:
        # r = A^H A x - A^H y, recomputed (one more step with gamma = -1) only when gamma is trained.
        minus_one = torch.full_like(gamma, -1.0)
        th, tw = (True, True) if y is not None else (transform_h, transform_w)
        r = mri_dc_step_op(x, coil_maps, mask, y, ahy, minus_one, th, tw, impl) - x
        ggamma = -torch.sum((grad.conj() * r).real, dim=(1, 2))
    return gx, None, None, gy, gahy, ggamma, None, None, None


mri_dc_step_op.register_autograd(_dc_backward, setup_context=_dc_setup)


def _mri_dc_step_cuda(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w):
    """The ``cuda`` backend. Level 2 (``csrc/dc_fftdx.cu``) where every transformed axis has a Level-2 length
    (256, 320, 368) and the GPU is sm_80+: cuFFTDx row and column passes with the coil expansion, shift signs,
    mask-residual-mask, conj(S), coil sum and gradient step fused into them. Level 1 (``csrc/dc_step.cu``) at any
    other size: cuFFT with LTO callbacks does the coil expansion and the centring shifts in the forward transform's
    loads, mask-residual-mask in its stores, conj(S) in the inverse's stores; one kernel sums the coils and takes the
    gradient step. ``MBDL_FAST_CUDA_LEVEL=1|2|auto`` forces one (mbdl_fast.backends.cuda_level). With A^H y given
    and a one-axis mask, only that axis is transformed (Level 2: one fused pass)."""
    from mbdl_fast._extension import mri_dc_step_cuda

    return mri_dc_step_cuda(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w)


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------
def _checks_wanted(check_inputs: bool) -> bool:
    # NaN checks synchronise the GPU; never inside a compiled graph, a CUDA-graph capture or a solver's iterations.
    return check_inputs and value_checks_wanted()


def _gamma_vector(gamma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(gamma, torch.Tensor):
        return torch.full((batch,), float(gamma), dtype=torch.float32, device=device)
    if gamma.is_complex() or gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] != batch):
        raise ValueError(
            f"gamma: expected a real scalar or a ({batch},) tensor (one per sample), got {describe(gamma)}"
        )
    check_same_device([("x", torch.empty(0, device=device)), ("gamma", gamma)])
    return gamma.to(torch.float32).expand(batch).contiguous() if gamma.dim() == 0 else gamma.to(torch.float32)


def dc_step(
    physics: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gamma: float | torch.Tensor,
    backend: str = "auto",
    AHy: torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """x - gamma A^H(A x - y) for ``physics``, by ``backend`` ("auto", "torch", "triton", "cuda").

    Args:
        physics: a ``mbdl_fast.physics`` operator.
        x: image, e.g. complex64 (B, H, W) for MRI.
        y: measurements, e.g. complex64 (B, C, H, W) k-space; may be None when ``AHy`` is given.
        gamma: step size >= 0, a float or a real tensor of shape () or (B,); differentiable.
        AHy: A^H y precomputed once per solve, shaped and typed exactly like x (then ``y`` is not used); with a
            Cartesian-line mask the step then transforms along the sampled axis only.
        check_inputs: refuse NaN/Inf in x, y, AHy and gamma (a GPU synchronisation; solvers check once per solve).
    """
    from mbdl_fast.physics.mri import MultiCoilMRI

    check_operator("physics", physics, ("A", "A_adjoint", "A_adjoint_A"))
    x = check_tensor("x", x)
    for arg, t in (("y", y), ("AHy", AHy)):
        if t is not None:
            check_tensor(arg, t)
    supported = ("torch",) + (_FUSED if isinstance(physics, MultiCoilMRI) else ())
    name = resolve_backend(backend, x.device, supported)
    if y is None and AHy is None:
        raise ValueError("y: expected measurements (or AHy = A^H y precomputed), got None for both")
    checks = _checks_wanted(check_inputs)
    check_step("gamma", gamma, x.shape[0] if x.dim() else 1, checks)
    if checks:
        for arg, t in (("x", x), ("y", y), ("AHy", AHy)):
            if t is not None:
                check_finite(arg, t)
    # Checked once here: the operator's own NaN scans would repeat these.
    if not isinstance(physics, MultiCoilMRI):
        return run_unchecked(_generic_dc_step, physics, x, y, gamma, AHy)
    return run_unchecked(_mri_dc_step, physics, x, y, gamma, name, AHy)


def _generic_dc_step(physics, x, y, gamma, ahy):
    """Any operator: its own reference, or x - gamma (A^H A x - A^H y) with ``AHy`` shaped exactly like x."""
    if ahy is None:
        check_operator("physics", physics, ("dc_step_reference",))
        return physics.dc_step_reference(x, y, gamma)
    normal = physics.A_adjoint_A(x)  # checks x against the operator
    if ahy.dtype != x.dtype or ahy.shape != x.shape:
        dtype = str(x.dtype).replace("torch.", "")
        raise ValueError(f"AHy: expected {dtype} {tuple(x.shape)} like x (A^H y), got {describe(ahy)}")
    check_same_device([("x", x), ("AHy", ahy)])
    return x - _gamma_view_like(gamma, x) * (normal - ahy)


def _gamma_view_like(gamma, x):
    from mbdl_fast.physics.base import _gamma_view

    return _gamma_view(gamma, x)


def _mri_dc_step(physics, x, y_in, gamma, backend, ahy_in):
    img, channel = physics._image_in("x", x)
    y = None if y_in is None else physics._kspace_in("y", y_in, img)
    ahy = None
    if ahy_in is not None:
        if ahy_in.shape != x.shape or ahy_in.dtype != x.dtype:
            dtype = str(x.dtype).replace("torch.", "")
            raise ValueError(f"AHy: expected {dtype} {tuple(x.shape)} like x (A^H y), got {describe(ahy_in)}")
        ahy, _ = physics._image_in("AHy", ahy_in)
    h, w = img.shape[-2:]
    if backend == "torch":
        # The physics' own methods, on the arguments in its layout (complex or real-packed), as given.
        if ahy is None:
            return physics.dc_step_reference(x, y_in, gamma)
        return x - _gamma_view_like(gamma, x) * (physics.A_adjoint_A(x) - ahy_in)
    if img.dtype != torch.complex64:
        raise TypeError(f"x: backend {backend!r} expects complex64 (B, H, W), got {describe(img)}")
    for arg, t in (("coil_maps", physics.coil_maps), ("mask", physics.mask)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{arg}: backend {backend!r} does not differentiate the operator; use backend='torch'")
    if y is not None and y.dtype != torch.complex64:
        raise TypeError(f"y: backend {backend!r} expects complex64 (B, C, H, W), got {describe(y)}")
    check_complex("x", img, "(B, H, W)", 3)
    dims = (-2, -1) if ahy is None else physics.transform_dims(h, w)
    g = _gamma_vector(gamma, img.shape[0], img.device)
    coil_maps = physics.coil_maps.contiguous() if physics.coil_maps is not None else None
    out = mri_dc_step_op(
        img.contiguous(),
        coil_maps,
        physics.mask_for(img),
        y.contiguous() if ahy is None else None,
        ahy.contiguous().to(torch.complex64) if ahy is not None else None,
        g,
        -2 in dims,
        -1 in dims,
        backend,
    )
    return physics._image_out(out, channel)
