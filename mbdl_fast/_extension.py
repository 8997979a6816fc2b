"""The one place that loads the compiled extension ``mbdl_fast._C`` (csrc/), and its tensor-level wrappers.

The extension takes raw device pointers and sizes; the wrappers here check the tensors, derive the strides and
launch on torch's current stream. Each op has a plain-PyTorch reference beside it that states the maths.

The ``cuda`` backend of the MRI DC step (:func:`mri_dc_step_cuda`) has two levels. Level 1: cuFFT with LTO
callbacks (csrc/dc_step.cu, csrc/dc_callbacks.cu), any size; cuFFT is opened at run time: the libcufft torch already
loaded, else the nvidia-cufft wheel's, else the one found at build time (:func:`level1_status` says which, or why
none). Level 2: cuFFTDx row/column passes with everything else fused (csrc/dc_fftdx.cu), for transformed axes of the
lengths :func:`level2_sizes` lists; header-only, nothing to load (:func:`level2_status`). :func:`cuda_dc_level` says
which level a step runs at and why (``MBDL_FAST_CUDA_LEVEL=auto|1|2``, mbdl_fast.backends.cuda_level).
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from mbdl_fast._validate import describe
from mbdl_fast.backends import CUDA_LEVEL_ENV, cuda_level

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
        level2 = level2_status()[1]
        return True, f"{ext.cuda_status()}; Level 1: {level1}; Level 2: {level2}"
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


@functools.lru_cache(maxsize=1)
def level2_status() -> tuple[bool, str]:
    """(True, what was built) when the Level-2 DC step was compiled into ``mbdl_fast._C``, else (False, why not).
    Never raises; whether a GPU runs it is :func:`cuda_dc_level`'s question (sm_80 or newer)."""
    try:
        ext, why = _load()
        if ext is None:
            return False, why
        built = ext.built_with()
        detail = built.get("level2_detail", "no reason recorded")
        if not built.get("level2"):
            return False, f"mbdl_fast._C was built without it ({detail})"
        return True, f"{detail}; lengths {', '.join(map(str, built['level2_sizes']))}"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"


def level2_sizes() -> tuple[int, ...]:
    """The transform lengths the Level-2 DC step has kernels for (every transformed axis must have one); () when
    the extension is not there."""
    ext, _ = _load()
    return tuple(ext.dc_level2_sizes()) if ext is not None else ()


def build_report() -> list[tuple[str, bool, str]]:
    """``(part, built, detail)`` for the CUDA extension and its Level-1 and Level-2 DC steps as installed here; the
    detail starts with "built:" or "not built:", and a part left out says why and, where a package fixes it, what
    to install (``mbdl-fast info`` prints this)."""
    from mbdl_fast import _build_hints

    ext, why = _load()
    if ext is None:
        return [("CUDA extension mbdl_fast._C", False, f"not built: {why}; {_build_hints.EXTENSION}")]
    built = ext.built_with()
    archs = built.get("cuda_archs")
    rows = [("CUDA extension mbdl_fast._C", True, f"built: CUDA {built.get('cuda_runtime')}, architectures {archs}")]
    for part, label in (("level1", "Level-1 DC step (cuFFT LTO callbacks)"), ("level2", "Level-2 DC step (cuFFTDx)")):
        detail = str(built.get(f"{part}_detail", "no reason recorded"))
        hint = "" if built.get(part) else _build_hints.hint(part, detail)
        rows.append((label, bool(built.get(part)), f"{detail}; to build it: {hint}" if hint else detail))
    return rows


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


@functools.lru_cache(maxsize=256)
def _level2_plan(B: int, C: int, H: int, W: int, th: bool, tw: bool) -> dict:
    return _require_extension().dc_level2_plan(B, C, H, W, th, tw, 1)


@functools.lru_cache(maxsize=256)
def _level2_workspace_bytes(device: int, B: int, C: int, H: int, W: int, th: bool, tw: bool) -> int:
    """K's bytes for a 2-D step (its batch chunk sized to this device's L2), 0 for 1-D."""
    return _require_extension().dc_level2_workspace_bytes(device, B, C, H, W, th, tw)


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
    ext = _require_extension()
    plan = _level2_plan(int(B), int(C), int(H), int(W), bool(transform_h), bool(transform_w))
    built, built_why = level2_status()
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
    level: str | int | None = None,
) -> torch.Tensor:
    """x - gamma (A^H A x - A^H y), A = M F_c S, by the extension's Level-1 or Level-2 step (no autograd: see
    mbdl_fast.dc); which one, :func:`cuda_dc_level` decides from ``level`` (else ``MBDL_FAST_CUDA_LEVEL``, else auto).

    x: contiguous complex64 (B, H, W) on cuda; coil_maps: None (one coil) or contiguous complex64 (B|1, C, H, W);
    mask: float32 (B|1, 1, H|1, W|1), any strides, constant along an axis that is not transformed; y: None or
    contiguous complex64 (B, C, H, W) (then both axes are transformed); ahy: None or contiguous complex64
    (B, H, W) (A^H y, precomputed); gamma: contiguous float32 (B,). With neither y nor ahy, A^H y = 0.
    Runs on torch's current stream. The maths, step by step: csrc/dc_common.h. callbacks=False (for tests and
    comparisons) runs the callbacks' maths as separate kernels around plain cuFFT plans, as the step does by itself
    where cuFFT cannot make callback plans (``mbdl_fast._C.dc_step_plans()`` says which and why); it is a Level-1
    option, so auto picks Level 1 with it. Level 2's passes and the bytes they move: csrc/dc_level2.h.
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
    _check_mask(mask, B, H, W)
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
    if cuda_level(level) == "2":  # sizes without a Level-2 path: a ValueError here too, before any device check
        cuda_dc_level(B, C, H, W, transform_h, transform_w, None, level, callbacks)
    # Devices last, so that the checks above also run (and are tested) on CPU tensors.
    if not x.is_cuda:
        raise _expected("x", "contiguous complex64 (B, H, W) on cuda", x)
    for name, t in (("coil_maps", coil_maps), ("mask", mask), ("y", y), ("ahy", ahy), ("gamma", gamma)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {describe(t)}")
    ext = _require_extension()
    sb, _, sh, sw = (0 if n == 1 else s for n, s in zip(mask.shape, mask.stride(), strict=True))
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    chosen, _ = cuda_dc_level(B, C, H, W, transform_h, transform_w, device, level, callbacks)

    def operands(out: torch.Tensor) -> dict:
        """The pointers, strides and sizes both levels take."""
        return {
            "x": x.data_ptr(), "coil": _ptr(coil_maps), "mask": mask.data_ptr(), "y": _ptr(y), "ahy": _ptr(ahy),
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
            ext.dc_step_level2(device=device, stream=stream, **operands(out), workspace=_ptr(workspace),
                               workspace_bytes=work)  # fmt: skip
        _LEVELS_RUN[2] += 1
        return out

    ok, why = level1_status()
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
                    workspace=_ptr(workspace), workspace_bytes=work, callbacks=bool(callbacks))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------
# Single-coil MRI prox (csrc/kspace_prox.cu): F_c^H [(F_c z + g M y) / (1 + g M²)], one k-space pass between FFTs.
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
    stream; no autograd (see mbdl_fast.prox).
    """
    z_expected = "contiguous complex64 (B, H, W) on cuda"
    z_k = _contiguous(z_k, torch.complex64, lambda t: t.dim() == 3, z_expected, "z_k")
    B, H, W = z_k.shape
    _check_mask(mask, B, H, W)
    if y is not None:
        y = _contiguous(
            y,
            torch.complex64,
            lambda t: tuple(t.shape) == (B, 1, H, W),
            f"None or contiguous complex64 {(B, 1, H, W)}",
            "y",
        )
    gamma = _contiguous(gamma, torch.float32, lambda t: tuple(t.shape) == (B,), f"contiguous float32 ({B},)", "gamma")
    # Devices last, so that the checks above also run (and are tested) on CPU tensors.
    if not z_k.is_cuda:
        raise _expected("z_k", z_expected, z_k)
    for name, t in (("mask", mask), ("y", y), ("gamma", gamma)):
        if t is not None and t.device != z_k.device:
            raise ValueError(f"{name}: expected a tensor on {z_k.device} (like z_k), got {describe(t)}")
    ext = _require_extension()
    sb, _, sh, sw = (0 if n == 1 else s for n, s in zip(mask.shape, mask.stride(), strict=True))
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
    """Single-coil prox F_c^H [(F_c z + g M y) / (1 + g M^2)]: cuFFT (torch.fft), the fused k-space kernel in place,
    inverse cuFFT. z: contiguous complex64 (B, H, W) on cuda; mask, y, gamma as :func:`kspace_prox_update_cuda`."""
    z = _contiguous(z, torch.complex64, lambda t: t.dim() == 3, "contiguous complex64 (B, H, W) on cuda", "z")
    if not z.is_cuda:
        raise _expected("z", "contiguous complex64 (B, H, W) on cuda", z)
    z_k = torch.fft.fft2(z, norm="backward").contiguous()
    kspace_prox_update_cuda(z_k, mask, y, gamma)
    return torch.fft.ifft2(z_k, norm="forward")


def _ptr(t: torch.Tensor | None) -> int:
    """A tensor's device address for the extension; 0 (null) for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def _check_mask(mask: torch.Tensor, B: int, H: int, W: int) -> None:
    """A k-space mask the kernels can index: float32 (B or 1, 1, H or 1, W or 1), broadcast by zero strides."""
    if not (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.float32
        and mask.dim() == 4
        and mask.shape[0] in (1, B)
        and mask.shape[1] == 1
        and mask.shape[2] in (1, H)
        and mask.shape[3] in (1, W)
    ):
        raise _expected("mask", f"float32 (B or 1, 1, H or 1, W or 1) with B, H, W = {B}, {H}, {W}", mask)
