"""Argument checks shared by every public entry point.

Errors name the argument, what was expected and what came, e.g.
``coil_maps: expected complex64 (B, C, H, W), got float32 (8, 2, 320, 320) on cpu``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch


def describe(t: torch.Tensor) -> str:
    """Short description of a tensor for error messages: dtype, shape, device."""
    dtype = str(t.dtype).replace("torch.", "")
    return f"{dtype} {tuple(t.shape)} on {t.device}"


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_complex(name: str, t: object, layout: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """Require a complex tensor with ``ndim`` dimensions (``layout`` names them, e.g. "(B, H, W)").

    A real tensor whose dimension 1 has size 2 is recognised as deepinv's real-packed layout and
    refused with a hint to convert it, never reinterpreted silently.
    """
    t = check_tensor(name, t)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if not t.is_complex():
        hint = ""
        if t.dim() >= 2 and t.shape[1] == 2:
            hint = " (this looks real-packed (B, 2, ...): convert with mbdl_fast.complex.from_real_packed)"
        elif t.dim() >= 1 and t.shape[-1] == 2:
            hint = " (this looks fastMRI's (..., 2) layout: convert with mbdl_fast.complex.from_fastmri)"
        raise TypeError(f"{name}: expected complex {layout}, got {describe(t)}{hint}")
    if t.dim() not in ndims:
        raise ValueError(f"{name}: expected complex {layout}, got {describe(t)}")
    return t


def check_real(name: str, t: object, layout: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """Require a real floating tensor with ``ndim`` dimensions."""
    t = check_tensor(name, t)
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.is_complex() or not t.is_floating_point() or t.dim() not in ndims:
        raise TypeError(f"{name}: expected real floating {layout}, got {describe(t)}")
    return t


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse NaN or Inf: they would propagate silently through every iteration of a solver."""
    if t.device.type == "meta":  # shapes only, no values to scan
        return t
    if not bool(torch.isfinite(t).all()):
        what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(f"{name}: contains {what} ({describe(t)})")
    return t


def check_same_device(pairs: list[tuple[str, torch.Tensor]]) -> None:
    """All named tensors must live on the device of the first one."""
    first_name, first = pairs[0]
    for name, t in pairs[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (like {first_name}), got {describe(t)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {layout}, got {describe(t)}")
    return t


def check_broadcastable(name: str, t: torch.Tensor, target: tuple[int, ...], layout: str) -> torch.Tensor:
    """``t`` must broadcast to ``target`` without growing ``target`` (no silent broadcast of the data)."""
    if t.dim() > len(target):
        raise ValueError(
            f"{name}: expected at most {len(target)} dims broadcastable to {layout} {target}, got {describe(t)}"
        )
    for got, want in zip(reversed(t.shape), reversed(target), strict=False):
        if got not in (1, want):
            raise ValueError(f"{name}: expected a shape broadcastable to {layout} {target}, got {describe(t)}")
    return t


def check_nonempty(name: str, t: torch.Tensor, layout: str) -> torch.Tensor:
    """Refuse zero-size tensors: an empty batch or image has no meaningful result (a mean over it is NaN)."""
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty {layout}, got {describe(t)}")
    return t


# ------------------------------------------------------------------------------------------------
# Scalars
# ------------------------------------------------------------------------------------------------
#: Upper bound on iteration counts (solver caps, unrolled iterations, CG): a config or checkpoint cannot ask for
#: a solve that never ends.
MAX_ITERATIONS = 10_000


def _bound_text(minimum: float | None, maximum: float | None, open_min: bool, open_max: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if open_min else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if open_max else '<='} {maximum:g}")
    return " and ".join(parts)


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``; bools, floats (even 3.0) and strings are refused."""
    bounds = _bound_text(minimum, maximum, False, False)
    what = f"an int {bounds}" if bounds else "an int"
    if isinstance(value, bool) or not isinstance(value, int):
        if not (hasattr(value, "__index__") and not isinstance(value, (bool, torch.Tensor))):
            raise TypeError(f"{name}: expected {what}, got {value!r}")
        value = value.__index__()  # numpy integers
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def check_number(
    name: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_min: bool = False,
    open_max: bool = False,
    meaning: str = "",
) -> float:
    """``value`` as a finite real Python float within the bounds; bools, complex numbers, NaN and Inf are refused.

    ``meaning`` (e.g. "a step size") is added to the message in parentheses.
    """
    bounds = _bound_text(minimum, maximum, open_min, open_max)
    what = f"a finite real{' ' + bounds if bounds else ''}{f' ({meaning})' if meaning else ''}"
    complex_number = isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real)
    if isinstance(value, (bool, str, bytes)) or complex_number or value is None:
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name}: expected {what}, got {describe(value)}")
        value = value.item()
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {what}, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    too_low = minimum is not None and (number <= minimum if open_min else number < minimum)
    too_high = maximum is not None and (number >= maximum if open_max else number > maximum)
    if too_low or too_high:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return number


def check_choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")
    return value


def check_step(name: str, gamma: object, batch: int, values: bool) -> None:
    """A step size: a finite real number >= 0, or a real tensor () or (B,) (one per sample) of them.

    Python numbers are always checked; a tensor's values only when ``values`` (a device synchronisation, so
    solvers whose learned steps live on the GPU skip it inside their iterations).
    """
    if not isinstance(gamma, torch.Tensor):
        check_number(name, gamma, 0.0, meaning="a step size")
        return
    if gamma.is_complex() or not gamma.is_floating_point():
        raise TypeError(f"{name}: expected a real floating scalar or ({batch},) tensor (one per sample), got "
                        f"{describe(gamma)}")  # fmt: skip
    if gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] != batch):
        raise ValueError(f"{name}: expected a scalar or shape ({batch},) (one per sample), got {describe(gamma)}")
    if values:
        check_finite(name, gamma)
        if bool((gamma < 0).any()):
            raise ValueError(f"{name}: expected >= 0 (a step size), got min {float(gamma.min()):g} "
                             f"({describe(gamma)})")  # fmt: skip


def check_device(name: str, value: object) -> torch.device:
    """A device string or ``torch.device`` that exists here (``cuda`` needs a visible GPU with that index)."""
    try:
        device = torch.device(value)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: expected a device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: expected an available device, got {value!r}, but torch sees no CUDA device "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use 'cpu'")  # fmt: skip
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: expected cuda:0 .. cuda:{count - 1}, got {value!r}")
    elif device.type not in ("cpu", "meta", "mps", "xpu"):
        raise ValueError(f"{name}: expected 'cpu' or 'cuda[:N]', got {value!r}")
    return device


def check_operator(name: str, obj: object, methods: tuple[str, ...]) -> None:
    """``obj`` must have the callable ``methods`` (duck typing: any operator with deepinv's names will do)."""
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(
            f"{name}: expected an mbdl_fast.physics operator (with {', '.join(methods)}), got {type(obj).__name__} "
            f"without {', '.join(missing)}"
        )


# ------------------------------------------------------------------------------------------------
# NaN/Inf scans: on by default, skipped inside solvers after their one scan per solve
# ------------------------------------------------------------------------------------------------
_VALUES_CHECKED = contextvars.ContextVar("mbdl_fast_values_checked", default=False)


def value_checks_wanted() -> bool:
    """Whether NaN/Inf scans (a device synchronisation) should run here: not inside :func:`skip_value_checks`,
    a compiled graph or a CUDA-graph capture."""
    if torch.compiler.is_compiling() or _VALUES_CHECKED.get():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def run_unchecked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the NaN/Inf scans of the operators and priors it calls skipped.

    A function, not a context manager, so that torch.compile traces straight through it (fullgraph).
    """
    if torch.compiler.is_compiling():
        return fn(*args, **kwargs)
    token = _VALUES_CHECKED.set(True)
    try:
        return fn(*args, **kwargs)
    finally:
        _VALUES_CHECKED.reset(token)


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Skip the NaN/Inf scans of operators, priors and ``dc_step`` inside the block (each is a GPU sync).

    For users' own unrolled loops that check their inputs once, as the package's solvers do.
    """
    token = _VALUES_CHECKED.set(True)
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)
