"""Per-shape choice between cuDNN (F.conv2d, channels_last) and the fused Triton kernel, timed once, cached.

The first call of a shape on a GPU times every candidate (``triton.testing.do_bench``: CUDA
events, median of repeats, after warm-up) and keeps the fastest; later calls reuse the choice.
A candidate that fails (e.g. a Triton compile error) is recorded with its error and never chosen.
Nothing is timed while a CUDA graph is being captured or under ``torch.compile`` tracing: such
calls use cuDNN unless the shape already has a choice (``accelerate`` warms up before capturing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

_DEFAULT = "torch"
_CHOICES: dict[tuple, dict[str, Any]] = {}


def _timing_allowed() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _median_ms(fn: Callable[[], Any]) -> float:
    import triton.testing  # optional dependency (GPU installs): only timing on a CUDA device reaches here

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def choose(op: str, key: tuple, candidates: dict[str, Callable[[], Any]]) -> str:
    """The cached fastest of ``candidates`` (name -> zero-argument callable) for ``(op, *key)``; times them once."""
    entry = _CHOICES.get((op, *key))
    if entry is not None:
        return entry["choice"]
    if not _timing_allowed():
        return _DEFAULT
    times: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            times[name] = _median_ms(fn)
        except Exception as exc:  # a kernel that cannot compile or run here is simply not chosen
            times[name] = math.inf
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    choice = min(times, key=lambda name: times[name])
    if math.isinf(times[choice]):
        choice = _DEFAULT
    _CHOICES[(op, *key)] = {"choice": choice, "ms": times, "errors": errors}
    return choice


def conv_choices() -> list[dict[str, Any]]:
    """Every choice made so far: op, key (input shape, dtype, channels_last, weight/flags), choice, median ms per candidate."""
    rows = []
    for (op, *key), entry in _CHOICES.items():
        rows.append({"op": op, "key": tuple(key), "choice": entry["choice"], "ms": dict(entry["ms"]),
                     "errors": dict(entry["errors"])})  # fmt: skip
    return rows


def clear_conv_choices() -> None:
    """Forget every cached choice (the next call of each shape times again)."""
    _CHOICES.clear()


def set_conv_choice(op: str, key: tuple, choice: str) -> None:
    """Pin a choice without timing (tests, or a choice table saved from an earlier run)."""
    _CHOICES[(op, *key)] = {"choice": choice, "ms": {}, "errors": {}}
