"""Image quality metrics on magnitude images: PSNR, NMSE, SSIM (fastMRI and scikit-image conventions).

Every metric takes ``(x, target)``: the reconstruction and the ground truth, both

- real ``(B, H, W)`` or ``(B, 1, H, W)`` (used as they are, negative values included), or
- complex ``(B, H, W)`` or ``(B, 1, H, W)``: the magnitude ``|x|`` is taken first (as fastMRI
  evaluates complex reconstructions).

Values are computed in float64 with batched torch ops (differentiable, any device) and returned as
float64: per image, a scalar for ``reduction="mean"`` (the mean over images) or ``(B,)`` for
``reduction="none"``; or, for ``reduction="volume"``, one scalar for the batch taken as one volume of B
slices, as fastMRI's ``evaluate`` computes its numbers: NMSE and PSNR over all the volume's pixels, SSIM
the mean over slices, each with the volume's maximum as data range (``fastmri.evaluate.nmse(gt, pred)``
etc.; note fastMRI's argument order is (target, x), ours (x, target)).

``data_range=None`` means the maximum of ``target``: per image, or over the volume for
``reduction="volume"`` (fastMRI's ``maxval = gt.max()``); a float or a ``(B,)`` tensor (not for
``"volume"``) may be given instead.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.functional import conv2d

from mbdl_fast._validate import check_finite, check_nonempty, check_same_device, check_tensor, describe

__all__ = ["nmse", "psnr", "ssim"]

_K1 = 0.01
_K2 = 0.03
_REDUCTIONS = ("mean", "none", "volume")
_WINDOWS = ("gaussian", "fastmri")


def psnr(
    x: torch.Tensor,
    target: torch.Tensor,
    data_range: float | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image: ``10 log10(R² / mean((x - target)²))``.

    ``R`` is ``data_range`` (default: the per-image maximum of ``target``, as fastMRI's ``psnr``).
    Equals ``skimage.metrics.peak_signal_noise_ratio(target, x, data_range=R)`` image by image.
    """
    _check_reduction(reduction)
    xs, ts = _prepare(x, target)
    r = _data_range(data_range, ts, reduction)
    if reduction == "volume":
        return 10.0 * torch.log10(r[0].square() / (xs - ts).square().mean())
    mse = (xs - ts).square().mean(dim=(1, 2, 3))
    return _reduce(10.0 * torch.log10(r.square() / mse), reduction)


def nmse(x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Normalised mean squared error, per image: ``||target - x||² / ||target||²`` (fastMRI's ``nmse``).

    fastMRI takes the norms over a whole volume: ``reduction="volume"`` does so over the batch; otherwise each
    image ``b`` is its own volume, and ``reduction="mean"`` averages the per-image values.
    """
    _check_reduction(reduction)
    xs, ts = _prepare(x, target)
    if reduction == "volume":
        return (ts - xs).square().sum() / ts.square().sum()
    err = (ts - xs).square().sum(dim=(1, 2, 3))
    energy = ts.square().sum(dim=(1, 2, 3))
    zero = torch.nonzero(energy == 0).flatten().tolist()
    if zero:
        raise ValueError(f"target: all zeros in image(s) {zero}; NMSE divides by ||target||², which is 0 there")
    return _reduce(err / energy, reduction)


def ssim(
    x: torch.Tensor,
    target: torch.Tensor,
    window: str = "gaussian",
    data_range: float | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), per image, mean over the valid region.

    With local means μ, variances σ², covariance σ_xt taken under the window ``w``::

        SSIM map = (2 μ_x μ_t + C1)(2 σ_xt + C2) / ((μ_x² + μ_t² + C1)(σ_x² + σ_t² + C2)),
        C1 = (K1 R)², C2 = (K2 R)², K1 = 0.01, K2 = 0.03, R = data_range,
        σ² = cov_norm · (w * x² - (w * x)²)   (likewise σ_xt),

    averaged over the pixels whose window lies inside the image (scikit-image crops
    ``(win - 1) // 2`` at each border; a valid convolution gives the same pixels).

    ``window``:

    - ``"gaussian"``: 11×11 Gaussian, σ = 1.5 (radius 5, truncate 3.5), cov_norm = 1; equals
      ``skimage.metrics.structural_similarity(target, x, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False, data_range=R)``.
    - ``"fastmri"``: 7×7 uniform, cov_norm = 49/48 (sample covariance); fastMRI's
      ``evaluate.ssim`` / ``SSIMLoss``, i.e. ``structural_similarity(target, x, win_size=7,
      data_range=R)``.

    Images must be at least as large as the window (11 or 7 pixels per side).
    """
    _check_reduction(reduction)
    if window not in _WINDOWS:
        raise ValueError(f"window: expected one of {_WINDOWS}, got {window!r}")
    xs, ts = _prepare(x, target)
    r = _data_range(data_range, ts, reduction)
    taps, cov_norm = _window_taps(window)
    win = taps.numel()
    if min(xs.shape[-2:]) < win:
        raise ValueError(f"x: expected images of at least {win}x{win} for window={window!r}, got {describe(x)}")

    # Five local moments in one depthwise, separable, valid convolution.
    stack = torch.cat((xs, ts, xs * xs, ts * ts, xs * ts), dim=1)
    w = taps.to(stack.device)
    stack = conv2d(stack, w.view(1, 1, win, 1).expand(5, 1, win, 1), groups=5)
    stack = conv2d(stack, w.view(1, 1, 1, win).expand(5, 1, 1, win), groups=5)
    mx, mt, mxx, mtt, mxt = stack.unbind(dim=1)
    vx = cov_norm * (mxx - mx * mx)
    vt = cov_norm * (mtt - mt * mt)
    vxt = cov_norm * (mxt - mx * mt)

    c1 = (_K1 * r).square().view(-1, 1, 1)
    c2 = (_K2 * r).square().view(-1, 1, 1)
    smap = (2 * mx * mt + c1) * (2 * vxt + c2) / ((mx * mx + mt * mt + c1) * (vx + vt + c2))
    return _reduce(smap.mean(dim=(1, 2)), "mean" if reduction == "volume" else reduction)


@functools.cache
def _window_taps(window: str) -> tuple[torch.Tensor, float]:
    """1-D taps (float64, CPU) of the separable window, and the covariance normalisation."""
    if window == "gaussian":
        # scipy.ndimage.gaussian_filter's kernel: radius int(truncate * sigma + 0.5) = 5.
        sigma, radius = 1.5, 5
        t = torch.arange(-radius, radius + 1, dtype=torch.float64)
        taps = torch.exp(-0.5 * t.square() / sigma**2)
        return taps / taps.sum(), 1.0
    win = 7
    n_pixels = win * win
    return torch.full((win,), 1.0 / win, dtype=torch.float64), n_pixels / (n_pixels - 1)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values


def _as_magnitude(name: str, t: object) -> torch.Tensor:
    """Validate one image batch and return it as float64 ``(B, 1, H, W)`` (magnitude if complex)."""
    t = check_tensor(name, t)
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name}: expected a real floating or complex (B, H, W) or (B, 1, H, W), got {describe(t)}")
    if t.dim() not in (3, 4) or (t.dim() == 4 and t.shape[1] != 1):
        raise ValueError(f"{name}: expected (B, H, W) or (B, 1, H, W), got {describe(t)}")
    check_nonempty(name, t, "(B, H, W) or (B, 1, H, W)")
    check_finite(name, t)
    t = t.abs() if t.is_complex() else t
    return t.to(torch.float64).reshape(t.shape[0], 1, t.shape[-2], t.shape[-1])


def _prepare(x: object, target: object) -> tuple[torch.Tensor, torch.Tensor]:
    xs = _as_magnitude("x", x)
    ts = _as_magnitude("target", target)
    if x.shape != target.shape:
        raise ValueError(f"x: expected the shape of target {tuple(target.shape)}, got {describe(x)}")
    check_same_device([("target", target), ("x", x)])
    return xs, ts


def _data_range(data_range: float | torch.Tensor | None, ts: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-image data range ``(B,)`` float64: given, or the maximum of the target (per image, or of the volume)."""
    batch = ts.shape[0]
    if reduction == "volume" and isinstance(data_range, torch.Tensor) and data_range.numel() != 1:
        raise ValueError(f"data_range: expected one value for reduction='volume', got {describe(data_range)}")
    if data_range is None and reduction == "volume":
        r = ts.amax().expand(batch)
        if not bool(r[0] > 0):
            raise ValueError("target: the default data_range is the volume's maximum, which is <= 0; pass data_range")
        return r
    if data_range is None:
        r = ts.amax(dim=(1, 2, 3))
        bad = torch.nonzero(r <= 0).flatten().tolist()
        if bad:
            raise ValueError(
                f"target: the default data_range is the per-image maximum, which is <= 0 for image(s) {bad}; "
                "pass data_range explicitly"
            )
        return r
    if isinstance(data_range, torch.Tensor):
        if data_range.numel() not in (1, batch) or data_range.dim() > 1:
            raise ValueError(
                f"data_range: expected a scalar or shape ({batch},) (one per image), got {describe(data_range)}"
            )
        r = data_range.to(device=ts.device, dtype=torch.float64).reshape(-1).expand(batch)
    elif isinstance(data_range, (int, float)) and not isinstance(data_range, bool):
        r = torch.full((batch,), float(data_range), dtype=torch.float64, device=ts.device)
    else:
        raise TypeError(f"data_range: expected None, a float or a tensor, got {type(data_range).__name__}")
    if not bool(((r > 0) & torch.isfinite(r)).all()):
        shown = data_range if not isinstance(data_range, torch.Tensor) else data_range.tolist()
        raise ValueError(f"data_range: expected positive finite values, got {shown}")
    return r
