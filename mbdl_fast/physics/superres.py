"""Single-image super-resolution: circular blur followed by s-fold decimation, with a closed-form prox.

    A x = D (k ⊛ x),   D keeps the pixels (s·i, s·j) (phase 0),   ⊛ = circular convolution.

Everything runs through FFTs. With F the unnormalised 2-D DFT of size H×W (``torch.fft.fft2``),
F_s the one of size h×w = H/s × W/s, K = F(k padded) the kernel spectrum, BM the mean over the
s×s distinct h×w blocks of a spectrum (its s² aliases) and T its adjoint up to 1/s² (tiling):

    A x       = F_s^{-1} BM(K ⊙ F x)                     (decimation in space = aliasing in frequency)
    A^H y     = F^{-1} (conj(K) ⊙ T(F_s y))
    A^H A x   = F^{-1} (conj(K) ⊙ T(BM(K ⊙ F x)))

On each group of s² aliased frequencies, I + γ A^H A is identity plus a rank-one term, so the
Sherman-Morrison formula inverts it (Zhao et al. 2016, "Fast single image super-resolution using a
new analytical solution for l2-l2 problems"):

    prox_l2(z, y, γ) = argmin_x γ/2 ||A x - y||² + 1/2 ||x - z||²
                     = F^{-1} [R - γ conj(K) ⊙ T(BM(K ⊙ R) / (1 + γ BM(|K|²)))],
    R = F z + γ conj(K) ⊙ T(F_s y)   (= F(z + γ A^H y)).

Built-in kernels, all separable and normalised to sum 1. Those named as deepinv's filters equal them
(``deepinv.physics.Downsampling(filter=NAME, factor=s, padding="circular")`` gives the same A):

- ``"gaussian"``: σ = s, taps at the integer offsets -c..c, c = int(s / 0.3 + 1) (deepinv's ``gaussian_blur``).
- ``"bicubic"``: Keys' cubic (a = -0.5) sampled at (k + 1/2) / s, 4s taps (deepinv's ``bicubic_filter``).
- ``"bilinear"``: the triangle 1 - |t| sampled at (k + 1/2) / s, 2s taps (deepinv's ``bilinear_filter``).

They follow deepinv's geometry, the user-kernel convention below. The ``block_`` kernels and ``"box"``
instead put low-resolution pixel (i, j) at the centre of the s×s block whose top-left pixel is
(s·i, s·j), i.e. at (s·i + (s-1)/2, s·j + (s-1)/2), as average pooling, MATLAB's/PIL's ``imresize`` and
``interpolate(align_corners=False)`` place it: each is symmetric about that centre (a half-pixel off
the grid for even s), so that with phase-0 decimation:

- ``"box"``: the s×s block mean, exactly ``avg_pool2d(x, s)`` (s×s taps).
- ``"block_bicubic"``: Keys' cubic stretched by s, the antialiasing kernel of MATLAB's
  ``imresize(x, 1/s, 'bicubic')``: A x equals MATLAB's result with circular instead of symmetric
  boundary handling. Support width 4s: 4s taps for even s, 4s - 1 for odd s. (For s = 2 it is
  ``"bicubic"``.)
- ``"block_gaussian"``: σ = s, taps within 3σ of the block centre (6s taps for even s, 6s + 1 for odd s).

A user kernel (real 2-D tensor, used as given, not normalised) has its centre at index
(kh // 2, kw // 2): the middle for odd sizes, as deepinv's ``conv2d``; an even-sized symmetric kernel
then sits at the same half-pixel as the block kernels for s = 2. Kernels larger than the image wrap
around (circular convolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mbdl_fast._validate import (
    check_finite,
    check_nonempty,
    check_real,
    check_same_device,
    check_tensor,
    describe,
    value_checks_wanted,
)
from mbdl_fast.physics.base import LinearPhysics, _gamma_view

__all__ = ["SuperResolution"]

KERNELS = ("gaussian", "bicubic", "bilinear", "block_gaussian", "block_bicubic", "box")
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_REAL_OF = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


class SuperResolution(LinearPhysics):
    """Blur + s-fold decimation ``A x = D(k ⊛ x)`` with a closed-form FFT prox (see the module docstring).

    Args:
        kernel: deepinv's ``"gaussian"`` (σ = factor), ``"bicubic"``, ``"bilinear"``; block-centred
            ``"block_gaussian"``, ``"block_bicubic"`` (MATLAB ``imresize``), ``"box"`` (block mean); or a
            real 2-D tensor ``(kh, kw)`` centred at ``(kh // 2, kw // 2)`` (module docstring).
        factor: decimation factor s (int ≥ 1).
        img_size: optional ``(H, W)``; when given, inputs must have that size.
        cg_tol, cg_max_iter: for the generic CG prox of the base class (not used by ``prox_l2`` here).

    Images ``x``: real ``(B, C, H, W)`` (e.g. RGB) or complex ``(B, H, W)`` / ``(B, 1, H, W)``;
    float32/float64 or complex64/complex128; H and W divisible by ``factor``. Measurements ``y``
    have the same leading dims and dtype kind, spatial size ``(H / s, W / s)``. Real images give
    real measurements. Inputs are scanned for NaN/Inf (a device sync) except inside solvers, which scan
    once per solve (``mbdl_fast.skip_value_checks``).

    Kernel spectra are cached per ``(H, W, device, dtype)``; ``update(kernel=..., factor=...)``
    clears the cache.
    """

    def __init__(
        self,
        kernel: str | torch.Tensor = "gaussian",
        factor: int = 2,
        img_size: tuple[int, int] | None = None,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 100,
    ) -> None:
        super().__init__(cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        self.factor = _check_factor(factor)
        self.img_size = _check_img_size(img_size, self.factor)
        self._kernel_spec = kernel
        self.kernel, self.kernel_center = _make_kernel(kernel, self.factor)
        self._spectra: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- parameters -------------------------------------------------------------------------------
    def _set_kernel(self, kernel: str | torch.Tensor) -> None:
        self.kernel, self.kernel_center = _make_kernel(kernel, self.factor)
        self._kernel_spec = kernel
        self._spectra.clear()

    def _set_factor(self, factor: int) -> None:
        factor = _check_factor(factor)
        _check_img_size(self.img_size, factor)
        self.kernel, self.kernel_center = _make_kernel(self._kernel_spec, factor)
        self.factor = factor
        self._spectra.clear()

    def _set_img_size(self, img_size: tuple[int, int] | None) -> None:
        self.img_size = _check_img_size(img_size, self.factor)

    def spectrum(
        self, H: int, W: int, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel spectrum ``K = fft2(k padded)`` ``(H, W)`` and ``BM(|K|²)`` ``(H/s, W/s)``, cached.

        ``dtype`` is the image dtype (real or complex); ``K`` is complex of the matching precision and
        ``BM(|K|²)`` real. Both are computed in float64 on the CPU, then cast and moved.
        """
        real = _REAL_OF[dtype]
        device = torch.device(device)
        key = (H, W, device, real)
        hit = self._spectra.get(key)
        if hit is None:
            s = self.factor
            k = self.kernel
            kh, kw = k.shape
            ci, cj = self.kernel_center
            # Tap (i, j) of the kernel acts at offset (i - ci, j - cj): place it there, circularly;
            # accumulate so that kernels larger than the image wrap around.
            rows = ((torch.arange(kh) - ci) % H).view(kh, 1).expand(kh, kw)
            cols = ((torch.arange(kw) - cj) % W).view(1, kw).expand(kh, kw)
            padded = torch.zeros(H, W, dtype=torch.float64).index_put_((rows, cols), k, accumulate=True)
            spec = torch.fft.fft2(padded)
            power = _block_mean(spec.abs().square(), s)
            hit = (spec.to(device=device, dtype=_COMPLEX_OF[real]), power.to(device=device, dtype=real))
            self._spectra[key] = hit
        return hit

    # -- the operator -----------------------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``x`` ``(B, C, H, W)`` real or ``(B, [1,] H, W)`` complex -> ``y`` ``(..., H/s, W/s)``."""
        self._check_image("x", x)
        spec, _ = self.spectrum(x.shape[-2], x.shape[-1], x.device, x.dtype)
        y = torch.fft.ifft2(_block_mean(spec * torch.fft.fft2(x), self.factor))
        return y if x.is_complex() else y.real.contiguous()

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``y`` ``(..., h, w)`` -> ``x`` ``(..., h·s, w·s)``: zero-upsampling then correlation with k."""
        self._check_measurement("y", y)
        s = self.factor
        spec, _ = self.spectrum(y.shape[-2] * s, y.shape[-1] * s, y.device, y.dtype)
        x = torch.fft.ifft2(spec.conj() * _tile(torch.fft.fft2(y), s))
        return x if y.is_complex() else x.real.contiguous()

    def prox_l2_reference(self, z: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """argmin_x γ/2 ||A x - y||² + 1/2 ||x - z||², in closed form (module docstring), exact to rounding.

        ``gamma``: a scalar or one step per sample ``(B,)``.
        """
        self._check_image("z", z)
        self._check_measurement("y", y)
        self._check_pair("z", z, y)
        s = self.factor
        g = _gamma_view(gamma, z)
        if isinstance(g, torch.Tensor):
            g = g.to(_REAL_OF[z.dtype])  # a float64 step must not promote a float32 problem
        spec, power = self.spectrum(z.shape[-2], z.shape[-1], z.device, z.dtype)
        spec_conj = spec.conj()
        r = torch.fft.fft2(z) + g * spec_conj * _tile(torch.fft.fft2(y), s)
        x = torch.fft.ifft2(r - g * spec_conj * _tile(_block_mean(spec * r, s) / (1 + g * power), s))
        return x if z.is_complex() else x.real.contiguous()

    # -- checks -----------------------------------------------------------------------------------
    def _check_dtype(self, name: str, t: object) -> torch.Tensor:
        t = check_tensor(name, t)
        if t.dtype not in _REAL_OF:
            raise TypeError(
                f"{name}: expected float32/float64 (B, C, H, W) or complex64/complex128 (B, H, W), got {describe(t)}"
            )
        if t.dim() not in (3, 4):
            raise ValueError(
                f"{name}: expected real (B, C, H, W) or complex (B, H, W) / (B, 1, H, W), got {describe(t)}"
            )
        check_nonempty(name, t, "(B, C, H, W) or (B, H, W)")
        if value_checks_wanted():
            check_finite(name, t)
        return t

    def _check_image(self, name: str, x: object) -> None:
        x = self._check_dtype(name, x)
        H, W = x.shape[-2:]
        s = self.factor
        if H % s or W % s:
            raise ValueError(
                f"{name}: expected H and W divisible by factor={s}, got (H, W) = ({H}, {W}) ({describe(x)})"
            )
        if self.img_size is not None and (H, W) != self.img_size:
            raise ValueError(f"{name}: expected (H, W) = {self.img_size} (img_size), got {describe(x)}")

    def _check_measurement(self, name: str, y: object) -> None:
        y = self._check_dtype(name, y)
        if self.img_size is not None:
            expected = (self.img_size[0] // self.factor, self.img_size[1] // self.factor)
            if tuple(y.shape[-2:]) != expected:
                raise ValueError(f"{name}: expected (h, w) = {expected} (img_size / factor), got {describe(y)}")

    def _check_pair(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.factor
        expected = tuple(x.shape[:-2]) + (x.shape[-2] // s, x.shape[-1] // s)
        if tuple(y.shape) != expected or y.is_complex() != x.is_complex():
            kind = "complex" if x.is_complex() else "real"
            raise ValueError(f"y: expected {kind} {expected} (the measurements of {name}), got {describe(y)}")
        check_same_device([(name, x), ("y", y)])

    def dc_step_reference(self, x: torch.Tensor, y: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
        """x - γ A^H(A x - y) in plain PyTorch (the base definition, with the shapes of x and y checked)."""
        self._check_image("x", x)
        self._check_measurement("y", y)
        self._check_pair("x", x, y)
        return super().dc_step_reference(x, y, gamma)

    def extra_repr(self) -> str:
        kernel = self._kernel_spec if isinstance(self._kernel_spec, str) else f"tensor{tuple(self.kernel.shape)}"
        return f"kernel={kernel!r}, factor={self.factor}, img_size={self.img_size}"


# -- spectra helpers ------------------------------------------------------------------------------
def _block_mean(spec: torch.Tensor, s: int) -> torch.Tensor:
    """Mean of the s×s distinct (H/s × W/s) blocks of ``(..., H, W)``: the s² aliases of each frequency."""
    if s == 1:
        return spec
    H, W = spec.shape[-2:]
    return spec.unflatten(-1, (s, W // s)).unflatten(-3, (s, H // s)).mean(dim=(-4, -2))


def _tile(spec: torch.Tensor, s: int) -> torch.Tensor:
    """``(..., h, w)`` -> ``(..., s·h, s·w)`` by repetition: the spectrum of the zero-upsampled signal."""
    if s == 1:
        return spec
    return spec.repeat((1,) * (spec.dim() - 2) + (s, s))


# -- kernels --------------------------------------------------------------------------------------
def _check_factor(factor: object) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor: expected an int >= 1, got {factor!r}")
    return factor


def _check_img_size(img_size: object, factor: int) -> tuple[int, int] | None:
    if img_size is None:
        return None
    try:
        H, W = (int(v) for v in img_size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"img_size: expected (H, W) or None, got {img_size!r}") from None
    if H < 1 or W < 1 or H % factor or W % factor:
        raise ValueError(f"img_size: expected positive (H, W) divisible by factor={factor}, got {img_size!r}")
    return (H, W)


def _keys_cubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``imresize`` 'bicubic')."""
    a = t.abs()
    inner = (1.5 * a - 2.5) * a * a + 1
    outer = ((-0.5 * a + 2.5) * a - 4) * a + 2
    return torch.where(a <= 1, inner, torch.where(a < 2, outer, torch.zeros_like(a)))


def _aligned_taps(
    profile: Callable[[torch.Tensor], torch.Tensor], radius: float, s: int, open_support: bool
) -> tuple[torch.Tensor, int]:
    """1-D taps of a symmetric ``profile`` centred on the block centre (s - 1)/2, normalised to sum 1.

    Output pixel n (before decimation) reads ``x[n + d]`` with weight ``profile(d - (s - 1)/2)`` for
    the integers d within ``radius`` of (s - 1)/2. Returned as a convolution kernel ``taps`` (tap i
    acts at offset ``i - centre``, i.e. reads ``x[n - (i - centre)]``) and its ``centre`` index.
    """
    c = (s - 1) / 2
    if open_support:
        d_min, d_max = math.floor(c - radius) + 1, math.ceil(c + radius) - 1
    else:
        d_min, d_max = math.ceil(c - radius), math.floor(c + radius)
    # The weights are symmetric about c, so the flip from correlation to convolution order is free;
    # tap i then stands for offset d = d_max - i, which puts the centre (d = 0) at index d_max.
    taps = profile(torch.arange(d_min, d_max + 1, dtype=torch.float64) - c)
    return taps / taps.sum(), d_max


def _deepinv_taps(kernel: str, s: int) -> torch.Tensor:
    """1-D taps of deepinv's filter ``kernel`` for factor s, normalised to sum 1, centre index len // 2."""
    if kernel == "gaussian":
        c = int(s / 0.3 + 1)
        t = torch.arange(-c, c + 1, dtype=torch.float64)
        taps = torch.exp(-0.5 * (t / s) ** 2)
    else:
        half = 2 * s if kernel == "bicubic" else s
        t = (torch.arange(2 * half, dtype=torch.float64) - half + 0.5) / s
        taps = _keys_cubic(t) if kernel == "bicubic" else 1 - t.abs()
    return taps / taps.sum()


def _make_kernel(kernel: str | torch.Tensor, s: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A kernel as a float64 CPU ``(kh, kw)`` tensor plus its centre index (see the module docstring)."""
    if isinstance(kernel, str):
        if kernel in ("gaussian", "bicubic", "bilinear"):
            taps = _deepinv_taps(kernel, s)
            c = len(taps) // 2
        elif kernel == "block_gaussian":
            sigma = float(s)
            taps, c = _aligned_taps(lambda t: torch.exp(-0.5 * (t / sigma) ** 2), 3 * sigma, s, open_support=False)
        elif kernel == "block_bicubic":
            taps, c = _aligned_taps(lambda t: _keys_cubic(t / s), 2 * s, s, open_support=True)
        elif kernel == "box":
            taps, c = _aligned_taps(torch.ones_like, (s - 1) / 2, s, open_support=False)
        else:
            raise ValueError(f"kernel: expected one of {KERNELS} or a real 2-D tensor, got {kernel!r}")
        return torch.outer(taps, taps), (c, c)
    check_real("kernel", kernel, "(kh, kw)", 2)
    check_finite("kernel", kernel)
    k = kernel.detach().to(device="cpu", dtype=torch.float64).clone()
    return k, (k.shape[0] // 2, k.shape[1] // 2)
