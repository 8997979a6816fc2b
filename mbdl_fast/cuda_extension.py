"""The one place that loads the compiled extension ``mbdl_fast._C`` (csrc/), says what it can run, and the helpers
its ops share to pass tensors to it.

The extension takes raw device pointers and sizes; each op's ``cuda`` implementation (``mbdl_fast.ops.<op>``) checks
its tensors, derives the strides and launches on torch's current stream, through :func:`require`, :func:`ptr`,
:func:`contiguous` and :func:`check_mask` here.

The MRI DC step's ``cuda`` implementation (``mbdl_fast.ops.dc_step``) has two levels. Level 1: cuFFT with LTO
callbacks (csrc/dc_step/dc_step.cu, dc_callbacks.cu), any size; cuFFT is opened at run time: the libcufft torch
already loaded, else the nvidia-cufft wheel's, else the one found at build time (:func:`level1_status` says which, or
why none). Level 2: cuFFTDx row/column passes with everything else fused (csrc/dc_step/dc_fftdx.cu), for transformed
axes of the lengths :func:`level2_sizes` lists; header-only, nothing to load (:func:`level2_status`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from mbdl_fast import _build_hints
from mbdl_fast._validate import describe

NOT_BUILT = "mbdl_fast._C was not built (installed without a CUDA toolkit or with MBDL_FAST_CUDA=0)"
REBUILD_HINT = "reinstall where nvcc is found, forcing the build: MBDL_FAST_CUDA=1 pip install --no-build-isolation ."


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    """(the module, "") or (None, why it is not there)."""
    try:
        # By name, at first use: the extension is optional (built only where nvcc was found).
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


def require() -> ModuleType:
    """The extension module, or a RuntimeError saying why it is not there and how to build it."""
    ext, why = _load()
    if ext is None:
        raise RuntimeError(f"the cuda backend is unavailable: {why}; {REBUILD_HINT}")
    return ext


def expected(name: str, expected: str, got: object) -> ValueError:
    """The ValueError of an argument ``name`` that is not what the kernel takes."""
    what = describe(got) if isinstance(got, torch.Tensor) else type(got).__name__
    return ValueError(f"{name}: expected {expected}, got {what}")


def contiguous(t: object, dtype: torch.dtype, shape_ok, expected_text: str, name: str) -> torch.Tensor:
    """``t`` when it is a contiguous ``dtype`` tensor whose shape passes ``shape_ok``, else :func:`expected`."""
    if not (isinstance(t, torch.Tensor) and t.dtype == dtype and shape_ok(t) and t.is_contiguous()):
        raise expected(name, expected_text, t)
    return t


def ptr(t: torch.Tensor | None) -> int:
    """A tensor's device address for the extension; 0 (null) for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()


def check_mask(mask: torch.Tensor, B: int, H: int, W: int) -> None:
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
        raise expected("mask", f"float32 (B or 1, 1, H or 1, W or 1) with B, H, W = {B}, {H}, {W}", mask)


def mask_strides(mask: torch.Tensor) -> tuple[int, int, int]:
    """Element strides (batch, h, w) of a (B|1, 1, H|1, W|1) mask, 0 along a broadcast axis."""
    sb, _, sh, sw = (0 if n == 1 else s for n, s in zip(mask.shape, mask.stride(), strict=True))
    return sb, sh, sw
