"""The one place that loads the compiled extension ``mbdl_fast._C`` (csrc/), and its tensor-level wrappers.

The extension takes raw device pointers and sizes; the wrappers here check the tensors, derive the strides and
launch on torch's current stream. Each op has a plain-PyTorch reference beside it that states the maths.

The ``cuda`` backend of the MRI DC step is the extension's Level-1 step (:func:`mri_dc_step_cuda`): cuFFT with
LTO callbacks (csrc/dc_step.cu, csrc/dc_callbacks.cu). cuFFT is opened at run time: the libcufft torch already
loaded, else the nvidia-cufft wheel's, else the one found at build time (:func:`level1_status` says which, or why
none).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
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
        ok, level1 = level1_status()
        if not ok:
            return False, f"{ext.cuda_status()}; but the Level-1 DC step is unavailable: {level1}"
        return True, f"{ext.cuda_status()}; Level 1: {level1}"
    except Exception as exc:  # a status query must answer, whatever breaks underneath
        return False, f"checking mbdl_fast._C raised {type(exc).__name__}: {exc}"


def cufft_library_candidates() -> list[str]:
    """libcufft.so.12 (CUDA 13's cuFFT) of the nvidia-cufft wheels importable here, best first."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    found = []
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        for sub in ("cu13", "cufft"):
            path = Path(location) / sub / "lib" / "libcufft.so.12"
            if path.is_file():
                found.append(str(path))
    return found


@functools.lru_cache(maxsize=1)
def level1_status() -> tuple[bool, str]:
    """(True, the cuFFT loaded) when the Level-1 DC step can run, else (False, why not). Never raises.

    Loads cuFFT on first call (no GPU needed for that); whether a device exists is :func:`cuda_extension_status`'s.
    """
    try:
        ext, why = _load()
        if ext is None:
            return False, why
        built = ext.built_with()
        if not built.get("level1"):
            return False, f"mbdl_fast._C was built without it ({built.get('level1_detail', 'no reason recorded')})"
        return True, ext.cufft_load(cufft_library_candidates())
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


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


# ------------------------------------------------------------------------------------------------
# The Level-1 MRI DC step (csrc/dc_step.cu): x - gamma (A^H A x - A^H y), cuFFT with LTO callbacks.
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _geometry(B: int, C: int, H: int, W: int, transform_h: bool, transform_w: bool) -> dict:
    return _require_extension().dc_geometry(B, C, H, W, transform_h, transform_w)


@functools.lru_cache(maxsize=256)
def _workspace_bytes(device: int, stream: int, B: int, C: int, H: int, W: int, th: bool, tw: bool, cb: bool) -> int:
    """Makes (once) the plans of this device, stream and shape; their workspace in bytes."""
    return _require_extension().dc_step_prepare(device, stream, B, C, H, W, th, tw, cb)


def _contiguous(t: object, dtype: torch.dtype, shape_ok, expected: str, name: str) -> torch.Tensor:
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and shape_ok(t) and t.is_contiguous()):
        raise _expected(name, expected, t)
    return t


def mri_dc_step_cuda(
    x: torch.Tensor,
    coil_maps: torch.Tensor | None,
    mask: torch.Tensor,
    y: torch.Tensor | None,
    ahy: torch.Tensor | None,
    gamma: torch.Tensor,
    transform_h: bool = True,
    transform_w: bool = True,
    callbacks: bool = True,
) -> torch.Tensor:
    """x - gamma (A^H A x - A^H y), A = M F_c S, by the extension's Level-1 step (no autograd: see mbdl_fast.dc).

    x: contiguous complex64 (B, H, W) on cuda; coil_maps: None (one coil) or contiguous complex64 (B|1, C, H, W);
    mask: float32 (B|1, 1, H|1, W|1), any strides, constant along an axis that is not transformed; y: None or
    contiguous complex64 (B, C, H, W) (then both axes are transformed); ahy: None or contiguous complex64
    (B, H, W) (A^H y, precomputed); gamma: contiguous float32 (B,). With neither y nor ahy, A^H y = 0.
    Runs on torch's current stream. The maths, step by step: csrc/dc_common.h. callbacks=False (for tests and
    comparisons) runs the callbacks' maths as separate kernels around plain cuFFT plans, as the step does by itself
    where cuFFT cannot make callback plans (``mbdl_fast._C.dc_step_plans()`` says which and why).
    """
    x = _contiguous(x, torch.complex64, lambda t: t.dim() == 3, "contiguous complex64 (B, H, W) on cuda", "x")
    B, H, W = x.shape
    if coil_maps is None:
        C = 1
    else:
        coil_maps = _contiguous(
            coil_maps,
            torch.complex64,
            lambda t: t.dim() == 4 and t.shape[0] in (1, B) and tuple(t.shape[2:]) == (H, W),
            f"None or contiguous complex64 (B or 1, C, H, W) with B, H, W = {B}, {H}, {W} (like x)",
            "coil_maps",
        )
        C = coil_maps.shape[1]
    mask_expected = f"float32 (B or 1, 1, H or 1, W or 1) with B, H, W = {B}, {H}, {W}"
    if not (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.float32
        and mask.dim() == 4
        and mask.shape[0] in (1, B)
        and mask.shape[1] == 1
        and mask.shape[2] in (1, H)
        and mask.shape[3] in (1, W)
    ):
        raise _expected("mask", mask_expected, mask)
    if y is not None:
        y = _contiguous(
            y, torch.complex64, lambda t: tuple(t.shape) == (B, C, H, W),
            f"None or contiguous complex64 {(B, C, H, W)} (B, C, H, W)", "y",
        )  # fmt: skip
        if not (transform_h and transform_w):
            raise ValueError("y: expected None with a one-axis transform (give A^H y as ahy instead), got a tensor")
    if ahy is not None:
        ahy = _contiguous(
            ahy, torch.complex64, lambda t: t.shape == x.shape, f"None or contiguous complex64 {(B, H, W)}", "ahy"
        )
    if y is not None and ahy is not None:
        raise ValueError("y, ahy: expected at most one of them, got both")
    gamma = _contiguous(gamma, torch.float32, lambda t: tuple(t.shape) == (B,), f"contiguous float32 ({B},)", "gamma")
    if not (transform_h or transform_w):
        raise ValueError("transform_h, transform_w: expected at least one transformed axis, got neither")
    # Devices last, so that the checks above also run (and are tested) on CPU tensors.
    if not x.is_cuda:
        raise _expected("x", "contiguous complex64 (B, H, W) on cuda", x)
    for name, t in (("coil_maps", coil_maps), ("mask", mask), ("y", y), ("ahy", ahy), ("gamma", gamma)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {describe(t)}")
    ext = _require_extension()
    ok, why = level1_status()
    if not ok:
        raise RuntimeError(f"the cuda backend's DC step is unavailable: {why}")

    sb, _, sh, sw = (0 if n == 1 else s for n, s in zip(mask.shape, mask.stride(), strict=True))
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        geometry = _geometry(B, C, H, W, bool(transform_h), bool(transform_w))
        work = _workspace_bytes(device, stream, B, C, H, W, bool(transform_h), bool(transform_w), bool(callbacks))
        z = torch.empty((B, C, H, W), dtype=torch.complex64, device=x.device)
        v = torch.empty_like(z) if geometry["separate_v"] else z
        workspace = torch.empty(work, dtype=torch.uint8, device=x.device) if work else None
        out = torch.empty_like(x)
        ext.dc_step(
            device=device,
            stream=stream,
            x=x.data_ptr(),
            coil=0 if coil_maps is None else coil_maps.data_ptr(),
            coil_batch_stride=0 if coil_maps is None or coil_maps.shape[0] == 1 else C * H * W,
            mask=mask.data_ptr(),
            mask_sb=sb,
            mask_sh=sh,
            mask_sw=sw,
            y=0 if y is None else y.data_ptr(),
            ahy=0 if ahy is None else ahy.data_ptr(),
            gamma=gamma.data_ptr(),
            out=out.data_ptr(),
            z=z.data_ptr(),
            v=v.data_ptr(),
            workspace=0 if workspace is None else workspace.data_ptr(),
            workspace_bytes=work,
            B=B,
            C=C,
            H=H,
            W=W,
            transform_h=bool(transform_h),
            transform_w=bool(transform_w),
            callbacks=bool(callbacks),
        )
    return out
