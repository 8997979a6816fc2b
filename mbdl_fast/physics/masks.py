"""Undersampling masks for Cartesian MRI, as fastMRI's ``subsample.py`` and SPADE define them.

Column masks are returned as float32 tensors of shape ``(1, W)`` (they broadcast against k-space
``(B, C, H, W)`` and vary along W only); 2-D masks as ``(H, W)``. ``mask_axes`` tells along which
axes a mask varies, which is what lets the DC step transform along that axis only.

fastMRI's formulas (``RandomMaskFunc`` / ``EquispacedMaskFunc``):

- low frequencies: ``num_low = round(W * center_fraction)``, a centred band starting at
  ``(W - num_low + 1) // 2``;
- random: every other column kept with probability ``(W / R - num_low) / (W - num_low)``;
- equispaced: columns ``round(offset + k * R')`` with ``R' = R (num_low - W) / (num_low R - W)``
  and a random ``offset`` in ``[0, round(R'))``.

As fastMRI's mask functions, ``random_mask`` and ``equispaced_mask`` take lists of accelerations and
center fractions (one pair drawn per call by the seeded generator) and, for equispaced masks, ``offset``.

SPADE's uniform mask: every R-th column plus a centred ACS band of ``int(W * 0.2 * 2 / R)`` columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mbdl_fast._validate import check_int, check_number, check_tensor

#: Longest k-space side a mask is made for: far beyond any scanner, and a hostile size cannot exhaust memory.
MAX_COLS = 1 << 16


def _check_seed(seed: int | None) -> int | None:
    return None if seed is None else check_int("seed", seed, 0, 2**32 - 1)  # numpy's RandomState range


def _values(value: object) -> list:
    """A number or a list of them, as a list (a string is neither: it stays one value, to be refused)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _fastmri_choice(
    center_fraction: float | Sequence[float],
    acceleration: float | Sequence[float],
    seed: int | None,
    allow_any_combination: bool,
    num_cols: int,
) -> tuple[np.random.RandomState, float, float]:
    """fastMRI's ``MaskFunc.choose_acceleration``: a (center fraction, acceleration) pair drawn from the lists,
    and the generator after that draw, so that the same seed gives fastMRI's mask bit for bit."""
    fractions, accelerations = _values(center_fraction), _values(acceleration)
    if not fractions or not accelerations:
        raise ValueError(
            f"center_fraction, acceleration: expected numbers or non-empty lists, got {fractions}, {accelerations}"
        )
    if len(fractions) != len(accelerations) and not allow_any_combination:
        raise ValueError(
            f"center_fraction: expected as many values as acceleration ({len(accelerations)}) unless "
            f"allow_any_combination=True, got {len(fractions)}: {fractions}"
        )
    for value in fractions:
        check_number("center_fraction", value, 0.0, 1.0)
    for value in accelerations:
        check_number("acceleration", value, 1.0, float(num_cols), meaning="at least one column in num_cols")
    rng = np.random.RandomState(_check_seed(seed))
    if allow_any_combination:
        return rng, rng.choice(fractions), rng.choice(accelerations)
    choice = rng.randint(len(fractions))
    return rng, fractions[choice], accelerations[choice]


def _check_num_cols(num_cols: int) -> None:
    check_int("num_cols", num_cols, 2, MAX_COLS)


def _low_freq_band(num_cols: int, center_fraction: float) -> tuple[int, int]:
    num_low = int(round(num_cols * center_fraction))
    start = (num_cols - num_low + 1) // 2
    return start, num_low


def _as_column_mask(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.float32)).reshape(1, -1)


def random_mask(
    num_cols: int,
    acceleration: float | Sequence[float],
    center_fraction: float | Sequence[float],
    seed: int | None = None,
    allow_any_combination: bool = False,
) -> torch.Tensor:
    """fastMRI's random column mask (``RandomMaskFunc``), ``(1, W)`` float32 of 0/1.

    ``acceleration`` and ``center_fraction`` may be lists, as fastMRI's ``accelerations`` and
    ``center_fractions``: one pair is drawn (or one of each with ``allow_any_combination``) by the seeded
    generator, as fastMRI does, so a seed gives fastMRI's mask for the same lists.
    """
    _check_num_cols(num_cols)
    rng, center_fraction, acceleration = _fastmri_choice(
        center_fraction, acceleration, seed, allow_any_combination, num_cols
    )
    start, num_low = _low_freq_band(num_cols, center_fraction)
    if num_low >= num_cols / acceleration and acceleration > 1:
        raise ValueError(
            f"center_fraction: {center_fraction} keeps {num_low} of {num_cols} columns, more than "
            f"1/acceleration = 1/{acceleration} of them"
        )
    prob = (num_cols / acceleration - num_low) / (num_cols - num_low) if num_cols > num_low else 1.0
    mask = rng.uniform(size=num_cols) < prob
    mask[start : start + num_low] = True
    return _as_column_mask(mask)


def equispaced_mask(
    num_cols: int,
    acceleration: int | Sequence[int],
    center_fraction: float | Sequence[float],
    seed: int | None = None,
    exact_fraction: bool = True,
    offset: int | None = None,
    allow_any_combination: bool = False,
) -> torch.Tensor:
    """fastMRI's equispaced column mask, ``(1, W)`` float32 of 0/1.

    ``exact_fraction=True`` is ``EquispacedMaskFractionFunc`` (the outer spacing is adjusted so that
    exactly 1/R of all columns are kept, the challenge's mask); ``False`` is ``EquispacedMaskFunc``
    (every R-th column from the offset, plus the centre). ``offset`` is fastMRI's: the first outer
    column, drawn at random in [0, round(spacing)) when ``None``. Lists of accelerations and center
    fractions as in :func:`random_mask`.
    """
    _check_num_cols(num_cols)
    rng, center_fraction, acceleration = _fastmri_choice(
        center_fraction, acceleration, seed, allow_any_combination, num_cols
    )
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise ValueError(f"offset: expected an int >= 0 or None, got {offset!r}")
    start, num_low = _low_freq_band(num_cols, center_fraction)
    mask = np.zeros(num_cols, dtype=bool)
    mask[start : start + num_low] = True
    if not exact_fraction:
        if int(acceleration) != acceleration:
            raise ValueError(f"acceleration: expected an integer with exact_fraction=False, got {acceleration!r}")
        first = rng.randint(0, high=round(acceleration)) if offset is None else offset
        mask[first :: int(acceleration)] = True
        return _as_column_mask(mask)
    if num_low * acceleration >= num_cols:
        raise ValueError(f"center_fraction: {center_fraction} with acceleration={acceleration} leaves no outer columns")
    adjusted = (acceleration * (num_low - num_cols)) / (num_low * acceleration - num_cols)
    first = rng.randint(0, high=round(adjusted)) if offset is None else offset
    samples = np.around(np.arange(first, num_cols - 1, adjusted)).astype(np.uint64)
    mask[samples] = True
    return _as_column_mask(mask)


def uniform_acs_mask(num_cols: int, acceleration: int) -> torch.Tensor:
    """SPADE's uniform mask: every R-th column plus a centred ACS band of ``int(W * 0.2 * 2 / R)`` columns."""
    _check_num_cols(num_cols)
    check_number("acceleration", acceleration, 1.0, float(num_cols), meaning="at least one column in num_cols")
    if int(acceleration) != acceleration:
        raise ValueError(f"acceleration: expected an integer for the uniform mask, got {acceleration!r}")
    r = int(acceleration)
    mask = np.zeros(num_cols, dtype=bool)
    mask[::r] = True
    num_acs = int(num_cols * 0.2 * 2 / r)
    start = (num_cols - num_acs + 1) // 2
    mask[start : start + num_acs] = True
    return _as_column_mask(mask)


def variable_density_mask(
    shape: tuple[int, int],
    acceleration: float,
    center_fraction: float = 0.08,
    decay: float = 2.0,
    seed: int | None = None,
) -> torch.Tensor:
    """2-D variable-density random mask ``(H, W)``: a fully sampled centred square of side
    ``center_fraction * min(H, W)`` and elsewhere i.i.d. sampling with probability ∝ (1 - r)^decay
    (r the normalised radius), scaled so that about ``H * W / acceleration`` points are kept."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape: expected (H, W), got {shape!r}")
    h, w = (check_int("shape", n, 2, MAX_COLS) for n in shape)
    check_number("acceleration", acceleration, 1.0, float(h * w), meaning="at least one point in H x W")
    check_number("center_fraction", center_fraction, 0.0, 1.0)
    check_number("decay", decay, 0.0)
    seed = _check_seed(seed)
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    r = np.clip(np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2) / np.sqrt(2), 0, 1)
    density = (1 - r) ** decay
    half = max(1, int(round(center_fraction * min(h, w) / 2)))
    center = np.zeros((h, w), dtype=bool)
    center[h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = True
    budget = h * w / acceleration - center.sum()
    outer = density * ~center
    if budget <= 0 or outer.sum() == 0:
        raise ValueError(
            f"center_fraction: {center_fraction} already keeps more than 1/acceleration = 1/{acceleration} of the "
            "points (or decay leaves none outside the centre)"
        )
    # Bisection on the scale so the expected count hits the budget (probabilities are clipped at 1).
    lo, hi = 0.0, 1.0
    while np.minimum(hi * outer, 1).sum() < budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(mid * outer, 1).sum() < budget else (lo, mid)
    prob = np.minimum(hi * outer, 1)
    mask = (np.random.RandomState(seed).uniform(size=(h, w)) < prob) | center
    return torch.from_numpy(mask.astype(np.float32))


def mask_axes(mask: torch.Tensor, height: int, width: int) -> tuple[int, ...]:
    """The image axes (-2 for H, -1 for W) along which ``mask`` (broadcastable to (..., H, W)) varies.

    A Cartesian column mask gives ``(-1,)``, a row mask ``(-2,)``, a 2-D pattern ``(-2, -1)``; a
    constant mask gives ``()``. Leading (batch, coil) dims may differ (one column mask per sample
    still varies along W only, so each sample's normal operator needs a 1-D transform only).
    """
    check_tensor("mask", mask)
    m = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 2 else mask
    varies_h = m.shape[-2] != 1 and bool((m != m[..., :1, :]).any())
    varies_w = m.shape[-1] != 1 and bool((m != m[..., :, :1]).any())
    return tuple(d for d, v in ((-2, varies_h), (-1, varies_w)) if v)
