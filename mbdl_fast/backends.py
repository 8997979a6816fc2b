"""The one backend switch: which implementations of the fused operators exist here, and which to use.

Backends:
- ``torch``: plain PyTorch, the readable reference; always available, any device.
- ``triton``: fused Triton kernels (``mbdl_fast.kernels``); CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` (the interpreter, for tests only: slow).
- ``cuda``: the compiled extension ``mbdl_fast._C`` (``csrc/``); CUDA tensors. Its MRI DC step has two levels:
  Level 1 (cuFFT with LTO callbacks, any size) and Level 2 (cuFFTDx row/column passes with everything fused, the
  shipped lengths only); :func:`cuda_level` says which is asked for (``MBDL_FAST_CUDA_LEVEL=auto|1|2``).

``auto`` picks, for the tensor's device, the fastest available backend that the operator supports.

The backend table: each fused op (``mbdl_fast.ops``) registers here, per backend, the function that implements it
(:func:`register`); a custom op runs ``implementation(op, impl)(...)`` and a caller resolves ``auto`` with
:func:`resolve_op`. :func:`op_backends` says, for one op and device, which backends can run it and why not.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mbdl_fast import cuda_extension

BACKENDS = ("torch", "triton", "cuda")
CUDA_LEVELS = ("auto", "1", "2")
CUDA_LEVEL_ENV = "MBDL_FAST_CUDA_LEVEL"
# Fastest first, per device type, as the benchmarks in bench/ measure it.
_PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why not when it cannot."""

    available: bool
    reason: str


_TRITON_STATUS: list[BackendStatus] = []  # filled once; a plain list, not lru_cache, so dynamo traces it cleanly


def _triton_import_status() -> BackendStatus:
    if not _TRITON_STATUS:
        try:
            import triton  # optional dependency: its absence is a status with the reason, not an ImportError

            _TRITON_STATUS.append(BackendStatus(True, f"triton {triton.__version__}"))
        except Exception as exc:  # ImportError, or a broken install raising anything
            reason = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
            _TRITON_STATUS.append(BackendStatus(False, reason))
    return _TRITON_STATUS[0]


@torch.compiler.assume_constant_result
def _cuda_extension_status() -> tuple[bool, str]:
    """The extension's answer, a constant to torch.compile: it imports a module and asks the driver, which dynamo
    cannot trace (fullgraph=True would fail on it)."""
    return cuda_extension.cuda_extension_status()


def triton_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name: str, device_type: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(True, f"torch {torch.__version__}")
    if name == "triton":
        imported = _triton_import_status()
        if not imported.available:
            return imported
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return BackendStatus(False, "no CUDA device visible to torch")
            return imported
        if triton_interpreter():
            return BackendStatus(True, f"{imported.reason}, CPU interpreter (TRITON_INTERPRET=1; for tests, slow)")
        return BackendStatus(
            False, f"triton needs a CUDA tensor (got {device_type}); set TRITON_INTERPRET=1 to interpret on CPU"
        )
    if name == "cuda":
        ok, reason = _cuda_extension_status()
        if ok and device_type != "cuda":
            return BackendStatus(False, f"the cuda backend needs CUDA tensors (got {device_type})")
        return BackendStatus(ok, reason)
    raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {name!r}")


def backends(device: str | torch.device | None = None) -> dict[str, BackendStatus]:
    """Availability of every backend for ``device`` (default: cuda if visible, else cpu), with reasons."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {name: _status(name, device_type) for name in BACKENDS}


def resolve_backend(requested: str, device: torch.device, supported: tuple[str, ...], op: str = "this operator") -> str:
    """Turn ``requested`` (a backend name or ``auto``) into a backend that can run ``supported`` ops on ``device``.

    An explicit request that cannot be honoured is an error with the reason, never a silent fallback.
    """
    if requested == "auto":
        for name in _PREFERENCE.get(device.type, ("torch",)):
            if name in supported and _status(name, device.type).available:
                return name
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS + ('auto',)}, got {requested!r}")
    if requested not in supported:
        raise ValueError(f"backend: {requested!r} is not implemented for {op}; supported: {supported}")
    status = _status(requested, device.type)
    if not status.available:
        raise RuntimeError(f"backend: {requested!r} is unavailable on {device}: {status.reason}")
    return requested


def cuda_level(requested: str | int | None = None) -> str:
    """The level of the ``cuda`` backend's MRI DC step asked for: ``"auto"``, ``"1"`` or ``"2"``.

    ``requested`` (a keyword of the internal call) wins; else the environment variable ``MBDL_FAST_CUDA_LEVEL``;
    else ``"auto"``: Level 2 (cuFFTDx) where every transformed axis has a Level-2 length and the GPU is sm_80 or
    newer, Level 1 (cuFFT with LTO callbacks) elsewhere. ``"2"`` on sizes without a Level-2 path is a ValueError
    (mbdl_fast.ops.dc_step.cuda_dc_level), never a silent fallback.
    """
    source = "level" if requested is not None else CUDA_LEVEL_ENV
    value = requested if requested is not None else os.environ.get(CUDA_LEVEL_ENV, "auto")
    text = str(value).strip().lower()
    if text not in CUDA_LEVELS:
        raise ValueError(f"{source}: expected one of {', '.join(CUDA_LEVELS)}, got {value!r}")
    return text


# ------------------------------------------------------------------------------------------------
# The backend table: op name -> backend -> implementation
# ------------------------------------------------------------------------------------------------
# An implementation is a callable, or "module:function" for one that needs an optional dependency (the Triton
# kernels import triton): loaded on first use, so that registering it imports nothing.
_TABLE: dict[str, dict[str, Callable | str]] = {}


def register(op: str, backend: str, implementation: Callable | str) -> None:
    """Make ``implementation`` the ``backend`` implementation of ``op`` (each op module registers its own)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _TABLE.setdefault(op, {})[backend] = implementation


def supported_backends(op: str) -> tuple[str, ...]:
    """The backends that implement ``op``, in :data:`BACKENDS` order."""
    if op not in _TABLE:
        raise ValueError(f"op: expected one of {tuple(sorted(_TABLE))}, got {op!r}")
    return tuple(name for name in BACKENDS if name in _TABLE[op])


def implementation(op: str, backend: str) -> Callable:
    """The function implementing ``op`` with ``backend``; a ValueError naming the supported backends otherwise."""
    impls = _TABLE.get(op, {})
    if backend not in impls:
        raise ValueError(f"impl: expected one of {supported_backends(op)} for {op}, got {backend!r}")
    found = impls[backend]
    if isinstance(found, str):
        module, name = found.split(":")
        found = impls[backend] = getattr(importlib.import_module(module), name)
    return found


def resolve_op(op: str, requested: str, device: torch.device) -> str:
    """:func:`resolve_backend` for ``op``, with the backends the table holds for it."""
    return resolve_backend(requested, device, supported_backends(op), op)


def op_backends(op: str, device: str | torch.device | None = None) -> dict[str, BackendStatus]:
    """For ``op``: every backend's availability on ``device`` (default as :func:`backends`), with reasons."""
    supported = supported_backends(op)
    return {
        name: status if name in supported else BackendStatus(False, f"{name} does not implement {op}")
        for name, status in backends(device).items()
    }
