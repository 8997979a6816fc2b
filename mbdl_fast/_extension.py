"""The one place that loads the compiled extension ``mbdl_fast._C`` (csrc/), and its tensor-level wrappers.

The extension takes raw device pointers and sizes; the wrappers here check the tensors, derive the strides and
launch on torch's current stream. Each op has a plain-PyTorch reference beside it that states the maths.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from mbdl_fast._validate import describe

NOT_BUILT = "mbdl_fast._C was not built (installed without a CUDA toolkit or with MBDL_FAST_CUDA=0)"
REBUILD_HINT = "reinstall where nvcc is found, forcing the build: MBDL_FAST_CUDA=1 pip install --no-build-isolation ."


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it is not there)."""
    try:
        return importlib.import_module("mbdl_fast._C"), ""
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "mbdl_fast._C":
            return None, NOT_BUILT
        # Built, but unloadable here: another Python, a missing symbol, ...
        return None, f"mbdl_fast._C failed to import ({type(exc).__name__}: {exc})"


@functools.lru_cache(maxsize=1)
def cuda_extension_status() -> tuple[bool, str]:
    """(True, the devices) when ``mbdl_fast._C`` can run kernels here, else (False, why not). Never raises."""
    try:
        ext, why = _load()
        if ext is None:
            return False, why
        if ext.cuda_device_count() == 0:
            return False, f"built, but no CUDA device: {ext.cuda_status()}"
        if torch.version.cuda is None:
            return False, "torch has no CUDA (CPU build)"
        if not torch.cuda.is_available():
            return False, f"torch sees no CUDA device although the extension does ({ext.cuda_status()})"
        return True, ext.cuda_status()
    except Exception as exc:  # a status query must answer, whatever breaks underneath
        return False, f"checking mbdl_fast._C raised {type(exc).__name__}: {exc}"


def _require_extension() -> ModuleType:
    ext, why = _load()
    if ext is None:
        raise RuntimeError(f"the cuda backend is unavailable: {why}; {REBUILD_HINT}")
    return ext


def _kspace_dc_signs(H: int, W: int, flip_h: bool, flip_w: bool, device: torch.device) -> torch.Tensor:
    """s[h, w] = (-1)^(h * flip_h + w * flip_w), float32 (H, W)."""
    h = torch.arange(H, device=device) * int(flip_h)
    w = torch.arange(W, device=device) * int(flip_w)
    return 1.0 - 2.0 * ((h[:, None] + w[None, :]) % 2).to(torch.float32)


def kspace_dc_update_ref(
    z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, flip_h: bool, flip_w: bool, c: float
) -> torch.Tensor:
    """Reference of the fused k-space DC update, out of place: ``m * (m * c * z - s * y)`` (``m * m * c * z`` if y is None).

    z, y: (B, C, H, W) complex; mask m: real, broadcastable to (H, W); s[h, w] = (-1)^(h * flip_h + w * flip_w).

    Why: with D = diag((-1)^n), the centered orthonormal DFT of even length N is F_c = (-1)^(N/2) D F D. So for
    A = M F_c S (mask M, coil maps S) and Z = F(D S x), the k-space residual of the DC gradient A^H (A x - y),
    taken back to the uncentered grid, is D M (M c D Z - y) = M (M c Z - D y), with c the product of the
    (-1)^(N/2) of the shifted axes and s = D on those axes. One pass between the two uncentered FFTs.
    """
    s = _kspace_dc_signs(z.shape[-2], z.shape[-1], flip_h, flip_w, z.device)
    mz = mask * (c * z)
    return mask * (mz - s * y) if y is not None else mask * mz


def _expected(name: str, expected: str, got: object) -> ValueError:
    what = describe(got) if isinstance(got, torch.Tensor) else type(got).__name__
    return ValueError(f"{name}: expected {expected}, got {what}")


def _mask_strides(mask: torch.Tensor, H: int, W: int, expected: str) -> tuple[int, int]:
    """Element strides of ``mask`` read as (H, W): 0 along a broadcast (size-1 or missing) axis."""
    if mask.dim() > 2 and any(n != 1 for n in mask.shape[:-2]):
        raise _expected("mask", expected, mask)
    plane = mask.reshape(mask.shape[-2:])
    try:
        plane = plane.expand(H, W)
    except RuntimeError:
        raise _expected("mask", expected, mask) from None
    return plane.stride(0), plane.stride(1)


def kspace_dc_update_cuda(
    z: torch.Tensor, mask: torch.Tensor, y: torch.Tensor | None, flip_h: bool, flip_w: bool, c: float
) -> None:
    """In place on z, with the CUDA kernel: ``z <- m * (m * c * z - s * y)`` (``z <- m * m * c * z`` if y is None).

    z: contiguous complex64 (B, C, H, W) on cuda; mask: real float32 broadcastable to (H, W), same device (any
    strides); y: like z, or None. Maths in :func:`kspace_dc_update_ref`. Runs on the current stream; no autograd.
    """
    z_expected = "contiguous complex64 (B, C, H, W) on cuda"
    if not (isinstance(z, torch.Tensor) and z.dtype == torch.complex64 and z.dim() == 4 and z.is_contiguous()):
        raise _expected("z", z_expected, z)
    B, C, H, W = z.shape
    mask_expected = f"real float32 broadcastable to (H, W) = {(H, W)} on {z.device} (like z)"
    if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.float32):
        raise _expected("mask", mask_expected, mask)
    stride_h, stride_w = _mask_strides(mask, H, W, mask_expected)
    y_expected = f"None or contiguous complex64 {tuple(z.shape)} on {z.device} (like z)"
    if y is not None and not (
        isinstance(y, torch.Tensor) and y.dtype == torch.complex64 and y.shape == z.shape and y.is_contiguous()
    ):
        raise _expected("y", y_expected, y)
    # Devices last, so that the checks above also run (and are tested) on CPU tensors.
    if not z.is_cuda:
        raise _expected("z", z_expected, z)
    if mask.device != z.device:
        raise _expected("mask", mask_expected, mask)
    if y is not None and y.device != z.device:
        raise _expected("y", y_expected, y)
    ext = _require_extension()
    with torch.cuda.device(z.device):
        ext.kspace_dc_update(
            z.data_ptr(),
            mask.data_ptr(),
            0 if y is None else y.data_ptr(),
            B,
            C,
            H,
            W,
            stride_h,
            stride_w,
            int(flip_h),
            int(flip_w),
            float(c),
            torch.cuda.current_stream(z.device).cuda_stream,
        )
