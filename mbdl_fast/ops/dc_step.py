"""``mri_dc_step``: the Cartesian MRI data-consistency gradient step as one fused op, single and multi-coil.

    x' = x - gamma (A^H A x - A^H y),   A = M F_c S

    x, ahy: (B, H, W) complex64;  coil_maps S: (B|1, C, H, W) complex64 or None (one coil);
    mask M: float32 (B|1, 1, H|1, W|1), constant along an axis that is not transformed;
    y: (B, C, H, W) complex64 or None;  gamma: float32 (B,);  transform_h, transform_w: the axes transformed.

A^H y comes from ``y`` (then both axes are transformed) or is given as ``ahy`` (A^H y precomputed; with a
Cartesian-line mask only the sampled axis is transformed: the other 1-D FFTs cancel in F^H M² F); with neither,
A^H y = 0. Every implementation takes ``(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w)``:

- ``torch``: :func:`mri_dc_step_ref`, plain PyTorch, the definition;
- ``triton``: kernels/mri_dc.py, coil expansion, centring shifts, mask-residual-mask and coil sum fused around two
  torch FFTs;
- ``cuda``: :func:`mri_dc_step_cuda`, the compiled extension (csrc/dc_step/). Level 2 (csrc/dc_step/dc_fftdx.cu)
  where every transformed axis has a Level-2 length (256, 320, 368) and the GPU is sm_80+: cuFFTDx row and column
  passes with the coil expansion, shift signs, mask-residual-mask, conj(S), coil sum and gradient step fused into
  them. Level 1 (csrc/dc_step/dc_step.cu) at any other size: cuFFT with LTO callbacks does the coil expansion and
  the centring shifts in the forward transform's loads, mask-residual-mask in its stores, conj(S) in the inverse's
  stores; one kernel sums the coils and takes the gradient step. :func:`cuda_dc_level` chooses
  (``MBDL_FAST_CUDA_LEVEL=1|2|auto``, mbdl_fast.backends.cuda_level).

The op (``mbdl_fast::mri_dc_step``) has autograd and a fake implementation, so ``torch.compile`` traces around it.
The step is affine in x and y and linear in gamma, so its backward is the same kind of step:

    dL/dx     = g - gamma A^H A g          (the same fused op, without y)
    dL/dy     = gamma A g                  (the forward operator, mbdl_fast.ops.mri_forward)
    dL/dA^H y = gamma g
    dL/dgamma = -Re <g, A^H A x - A^H y>   per sample

with g = dL/dx' (PyTorch's conjugate-Wirtinger convention for complex tensors).
"""

from __future__ import annotations

import collections
import functools

import torch

from mbdl_fast import cuda_extension
from mbdl_fast._validate import describe
from mbdl_fast.backends import CUDA_LEVEL_ENV, cuda_level, implementation, register, supported_backends
from mbdl_fast.cuda_extension import check_mask, contiguous, expected, mask_strides, ptr
from mbdl_fast.fft import fftc, ifftc
from mbdl_fast.ops.mri_forward import coil_combine, coil_expand, mri_adjoint_ref, mri_forward_op, mri_forward_ref

OP = "mri_dc_step"


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
    """x - gamma (A^H A x - A^H y) by backend ``impl`` (module docstring: the arguments and their shapes)."""
    return implementation(OP, impl)(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w)


@mri_dc_step_op.register_fake
def _(x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w, impl):
    return torch.empty_like(x)


def mri_dc_step_ref(x, coil_maps, mask, y, ahy, gamma, transform_h=True, transform_w=True) -> torch.Tensor:
    """x - gamma (A^H A x - A^H y) in plain PyTorch (arguments: :func:`mri_dc_step_op`; any complex dtype, gamma also
    a float or any tensor viewable as (B, 1, 1)): the definition the fused implementations are checked against.

    With ``y``, literally x - gamma A^H(A x - y) (2-D FFTs); else the normal operator along the axes asked for."""
    g = gamma.to(x.real.dtype).reshape(-1, 1, 1) if isinstance(gamma, torch.Tensor) else gamma
    if y is not None:
        return x - g * mri_adjoint_ref(mri_forward_ref(x, coil_maps, mask) - y, coil_maps, mask)
    dims = tuple(d for d, on in ((-2, transform_h), (-1, transform_w)) if on)
    normal = coil_combine(ifftc(mask * mask * fftc(coil_expand(x, coil_maps), dims), dims), coil_maps)
    return x - g * (normal if ahy is None else normal - ahy)


def _setup(ctx, inputs, output):
    x, coil_maps, mask, y, ahy, gamma, transform_h, transform_w, impl = inputs
    ctx.save_for_backward(x, coil_maps, mask, y, ahy, gamma)
    ctx.flags = (transform_h, transform_w, impl)


def _backward(ctx, grad):
    x, coil_maps, mask, y, ahy, gamma = ctx.saved_tensors
    transform_h, transform_w, impl = ctx.flags
    needs = ctx.needs_input_grad
    grad = grad.contiguous()
    gx = gy = gahy = ggamma = None
    g_view = gamma.view(-1, 1, 1)
    if needs[0]:
        gx = mri_dc_step_op(grad, coil_maps, mask, None, None, gamma, transform_h, transform_w, impl)
    if needs[3] and y is not None:
        # The forward operator by the same backend where it has one; the cuda extension has none, so torch's
        # (cuFFT through torch.fft) computes this term for it.
        forward_impl = impl if impl in supported_backends("mri_forward") else "torch"
        gy = g_view.unsqueeze(1) * mri_forward_op(grad, coil_maps, mask, forward_impl)
    if needs[4] and ahy is not None:
        gahy = g_view * grad
    if needs[5]:
        # r = A^H A x - A^H y, recomputed (one more step with gamma = -1) only when gamma is trained.
        minus_one = torch.full_like(gamma, -1.0)
        th, tw = (True, True) if y is not None else (transform_h, transform_w)
        r = mri_dc_step_op(x, coil_maps, mask, y, ahy, minus_one, th, tw, impl) - x
        ggamma = -torch.sum((grad.conj() * r).real, dim=(1, 2))
    return gx, None, None, gy, gahy, ggamma, None, None, None


mri_dc_step_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# The cuda implementation: Level 1 (cuFFT with LTO callbacks) or Level 2 (cuFFTDx), and the policy between them
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _geometry(B: int, C: int, H: int, W: int, transform_h: bool, transform_w: bool) -> dict:
    return cuda_extension.require().dc_geometry(B, C, H, W, transform_h, transform_w)


@functools.lru_cache(maxsize=256)
def _workspace_bytes(device: int, stream: int, B: int, C: int, H: int, W: int, th: bool, tw: bool, cb: bool) -> int:
    """Makes (once) the plans of this device, stream and shape; their workspace in bytes."""
    return cuda_extension.require().dc_step_prepare(device, stream, B, C, H, W, th, tw, cb)


@functools.lru_cache(maxsize=256)
def _level2_plan(B: int, C: int, H: int, W: int, th: bool, tw: bool) -> dict:
    return cuda_extension.require().dc_level2_plan(B, C, H, W, th, tw, 1)


@functools.lru_cache(maxsize=256)
def _level2_workspace_bytes(device: int, B: int, C: int, H: int, W: int, th: bool, tw: bool) -> int:
    """K's bytes for a 2-D step (its batch chunk sized to this device's L2), 0 for 1-D."""
    return cuda_extension.require().dc_level2_workspace_bytes(device, B, C, H, W, th, tw)


@functools.lru_cache(maxsize=16)
def _capability(device: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


_LEVELS_RUN: collections.Counter = collections.Counter()


def cuda_dc_level_runs() -> dict[int, int]:
    """How many cuda-backend DC steps ran at each level in this process (launched from Python; a CUDA-graph replay
    launches without Python and is not counted)."""
    return dict(_LEVELS_RUN)


def cuda_dc_level(
    B: int,
    C: int,
    H: int,
    W: int,
    transform_h: bool = True,
    transform_w: bool = True,
    device: int | torch.device | None = None,
    level: str | int | None = None,
    callbacks: bool = True,
) -> tuple[int, str]:
    """(1 or 2, why): the level the cuda backend's DC step runs at for these sizes (B, C, H, W, transformed axes).

    ``level`` (else ``MBDL_FAST_CUDA_LEVEL``, else auto; mbdl_fast.backends.cuda_level): "1" always Level 1; "2"
    always Level 2, a ValueError naming the Level-2 lengths when a transformed axis has none, a RuntimeError when
    Level 2 was not built or the GPU predates sm_80; "auto" Level 2 wherever it can run, else Level 1 (also when
    ``callbacks`` is False: that asks for Level 1's plain-cuFFT variant). ``device`` (a CUDA device) is needed
    for the sm_80 check; without it only the sizes and the build are looked at.
    """
    requested = cuda_level(level)
    source = f"level={level!r}" if level is not None else f"{CUDA_LEVEL_ENV}={requested}"
    if requested == "1":
        return 1, f"Level 1 asked for ({source})"
    ext = cuda_extension.require()
    plan = _level2_plan(int(B), int(C), int(H), int(W), bool(transform_h), bool(transform_w))
    built, built_why = cuda_extension.level2_status()
    index = None
    if device is not None:
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
    capability = _capability(index) if index is not None else None
    old_gpu = capability is not None and capability < (8, 0)
    gpu = f"device {index} is sm_{capability[0]}{capability[1]}" if capability is not None else ""
    if requested == "2":
        if not plan["supported"]:
            sizes = ", ".join(map(str, ext.dc_level2_sizes()))
            axes = [(n, v) for n, v, t in (("H", H, transform_h), ("W", W, transform_w)) if t]
            bad = [(n, v) for n, v in axes if v not in ext.dc_level2_sizes()]
            if not bad:
                raise ValueError(f"C: {plan['why_not']} ({source})")
            raise ValueError(
                f"{', '.join(n for n, _ in bad)}: expected a Level-2 length ({sizes}) on every transformed axis "
                f"for {source}, got {', '.join(f'{n} = {v}' for n, v in bad)}; use level 1 or auto for these sizes"
            )
        if not built:
            raise RuntimeError(f"{source}: the Level-2 DC step is unavailable: {built_why}")
        if old_gpu:
            raise RuntimeError(f"{source}: the Level-2 DC step needs sm_80 or newer; {gpu}")
        return 2, f"Level 2 asked for ({source})"
    if not callbacks:
        return 1, "Level 1's plain-cuFFT variant asked for (callbacks=False)"
    if not built:
        return 1, f"Level 2 unavailable: {built_why}"
    if not plan["supported"]:
        return 1, plan["why_not"]
    if old_gpu:
        return 1, f"Level 2 needs sm_80 or newer; {gpu}"
    return 2, "every transformed axis has a Level-2 length"


def mri_dc_step_cuda(
    x, coil_maps, mask, y, ahy, gamma, transform_h=True, transform_w=True, callbacks: bool = True, level=None
) -> torch.Tensor:
    """The ``cuda`` implementation of :func:`mri_dc_step_op` (no autograd: the op's): the extension's Level-1 or Level-2
    step; which one, :func:`cuda_dc_level` decides from ``level`` (else ``MBDL_FAST_CUDA_LEVEL``, else auto).

    The arguments of :func:`mri_dc_step_op`, contiguous on one CUDA device (the mask in any strides); each one that
    is not what the kernels take is a ValueError naming it. Runs on torch's current stream. The maths, step by step: csrc/dc_step/dc_common.h. callbacks=False (for tests and
    comparisons) runs the callbacks' maths as separate kernels around plain cuFFT plans, as the step does by itself
    where cuFFT cannot make callback plans (``mbdl_fast._C.dc_step_plans()`` says which and why); it is a Level-1
    option, so auto picks Level 1 with it. Level 2's passes and the bytes they move: csrc/dc_step/dc_level2.h.
    """
    x = contiguous(x, torch.complex64, lambda t: t.dim() == 3, "contiguous complex64 (B, H, W) on cuda", "x")
    B, H, W = x.shape
    if coil_maps is None:
        C = 1
    else:
        coil_maps = contiguous(
            coil_maps,
            torch.complex64,
            lambda t: t.dim() == 4 and t.shape[0] in (1, B) and tuple(t.shape[2:]) == (H, W),
            f"None or contiguous complex64 (B or 1, C, H, W) with B, H, W = {B}, {H}, {W} (like x)",
            "coil_maps",
        )
        C = coil_maps.shape[1]
    check_mask(mask, B, H, W)
    if y is not None:
        y = contiguous(
            y, torch.complex64, lambda t: tuple(t.shape) == (B, C, H, W),
            f"None or contiguous complex64 {(B, C, H, W)} (B, C, H, W)", "y",
        )  # fmt: skip
        if not (transform_h and transform_w):
            raise ValueError("y: expected None with a one-axis transform (give A^H y as ahy instead), got a tensor")
    if ahy is not None:
        ahy = contiguous(
            ahy, torch.complex64, lambda t: t.shape == x.shape, f"None or contiguous complex64 {(B, H, W)}", "ahy"
        )
    if y is not None and ahy is not None:
        raise ValueError("y, ahy: expected at most one of them, got both")
    gamma = contiguous(gamma, torch.float32, lambda t: tuple(t.shape) == (B,), f"contiguous float32 ({B},)", "gamma")
    if not (transform_h or transform_w):
        raise ValueError("transform_h, transform_w: expected at least one transformed axis, got neither")
    if cuda_level(level) == "2":  # sizes without a Level-2 path: a ValueError here too, before any device check
        cuda_dc_level(B, C, H, W, transform_h, transform_w, None, level, callbacks)
    # Devices last, so that the checks above also run (and are tested) on CPU tensors.
    if not x.is_cuda:
        raise expected("x", "contiguous complex64 (B, H, W) on cuda", x)
    for name, t in (("coil_maps", coil_maps), ("mask", mask), ("y", y), ("ahy", ahy), ("gamma", gamma)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {describe(t)}")
    ext = cuda_extension.require()
    sb, sh, sw = mask_strides(mask)
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    chosen, _ = cuda_dc_level(B, C, H, W, transform_h, transform_w, device, level, callbacks)

    def operands(out: torch.Tensor) -> dict:
        """The pointers, strides and sizes both levels take."""
        return {
            "x": x.data_ptr(), "coil": ptr(coil_maps), "mask": mask.data_ptr(), "y": ptr(y), "ahy": ptr(ahy),
            "coil_batch_stride": 0 if coil_maps is None or coil_maps.shape[0] == 1 else C * H * W,
            "mask_sb": sb, "mask_sh": sh, "mask_sw": sw, "gamma": gamma.data_ptr(), "out": out.data_ptr(),
            "B": B, "C": C, "H": H, "W": W, "transform_h": bool(transform_h), "transform_w": bool(transform_w),
        }  # fmt: skip

    if chosen == 2:
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            work = _level2_workspace_bytes(device, B, C, H, W, bool(transform_h), bool(transform_w))
            workspace = torch.empty(work, dtype=torch.uint8, device=x.device) if work else None
            out = torch.empty_like(x)
            ext.dc_step_level2(device=device, stream=stream, **operands(out), workspace=ptr(workspace),
                               workspace_bytes=work)  # fmt: skip
        _LEVELS_RUN[2] += 1
        return out

    ok, why = cuda_extension.level1_status()
    if not ok:
        raise RuntimeError(f"the cuda backend's DC step is unavailable: {why}")
    _LEVELS_RUN[1] += 1
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        geometry = _geometry(B, C, H, W, bool(transform_h), bool(transform_w))
        work = _workspace_bytes(device, stream, B, C, H, W, bool(transform_h), bool(transform_w), bool(callbacks))
        z = torch.empty((B, C, H, W), dtype=torch.complex64, device=x.device)
        v = torch.empty_like(z) if geometry["separate_v"] else z
        workspace = torch.empty(work, dtype=torch.uint8, device=x.device) if work else None
        out = torch.empty_like(x)
        ext.dc_step(device=device, stream=stream, **operands(out), z=z.data_ptr(), v=v.data_ptr(),
                    workspace=ptr(workspace), workspace_bytes=work, callbacks=bool(callbacks))  # fmt: skip
    return out


register(OP, "torch", mri_dc_step_ref)
register(OP, "triton", "mbdl_fast.kernels.mri_dc:mri_dc_step_triton")
register(OP, "cuda", mri_dc_step_cuda)
